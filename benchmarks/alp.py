"""ALP against plain baselines on the default job with a real train-inference mismatch (bf16 rollout engine).

The default job (built-in tiny model warm-started 400 steps, 1-2 digit addition, 16 prompts x 8, lr 2e-5) with the
rollout engine in bf16 and the trainer in fp32, ``--steps`` RL steps per run, one ``tether train`` subprocess per
run (benchmarks/train_runs.py). Methods:

    grpo          plain GRPO (ratio pi_theta / pi_old, no correction of mu)
    seq-bypass    alp_seq without noise: PPO on the product ratio pi_theta / mu (the paper's Seq-Bypass)
    seq-alp       alp_seq with --alp: the same ratio with pi_theta perturbed per layer (the paper's Seq-ALP)
    token-alp     alp with --alp (Token-ALP)

Reported per method: held-out greedy accuracy change (200 problems) with every seed's before -> after, the
meter's token ratio tail (p99 of |log pi_old / mu|: with --alp pi_old is the perturbed training forward, i.e.
ALP's own numerator), the mean clip fraction, the final mean sigma, seconds per step.

    python benchmarks/alp.py [--steps 30] [--seeds 0 1 2] [--jobs 2] [--alp-std 0.001] [--out DIR [--reuse]]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from train_runs import (  # benchmarks/ is on sys.path when run
    accuracy_change,
    add_run_options,
    fmt,
    mean_of,
    run_and_print,
    run_dir,
)

SOURCE = "bf16 rollout"
BASE = ["--rollout-precision", "bf16"]


def methods(std: float, lr: float) -> list[tuple[str, list[str]]]:
    alp = ["--alp", "--alp-std", str(std), "--alp-lr", str(lr)]
    return [
        ("grpo", []),
        ("seq-bypass", ["--objective", "alp_seq"]),
        ("seq-alp", ["--objective", "alp_seq", *alp]),
        ("token-alp", ["--objective", "alp", *alp]),
    ]


def extra(out: Path, method: str, seed: int) -> dict:
    """The ALP-specific columns of one finished run, read from its metrics."""
    rows = [json.loads(line) for line in (run_dir(out, SOURCE, method, seed) / "metrics.jsonl").read_text().splitlines()]
    return {"logr_p99": mean_of(rows, "meter/total/abs_logr_p99"), "clipfrac": mean_of(rows, "pg/clipfrac"),
            "sigma_end": rows[-1].get("alp/sigma_mean")}


def table(results: list[dict], out: Path) -> str:
    lines = ["| method | held-out acc change, points (mean ± sd; per seed before->after) | p99 abs log-ratio "
             "(pi_old/mu) | clip fraction | sigma at the end | s/step |", "|---|---|---|---|---|---|"]
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r["method"], []).append(r)
    for method, rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            lines.append(f"| {method} | failed: {rs[0]['error'][-200:]!r} |")
            continue
        acc = accuracy_change(ok)
        ex = [extra(out, method, r["seed"]) for r in ok]
        m = {k: statistics.mean(v) if (v := [e[k] for e in ex if e[k] is not None]) else None
             for k in ("logr_p99", "clipfrac", "sigma_end")}
        lines.append(f"| {method} | {acc} | "
                     f"{fmt(m['logr_p99'])} | {fmt(m['clipfrac'])} | {fmt(m['sigma_end'])} | "
                     f"{statistics.mean(r['step_s'] for r in ok):.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_options(ap, seeds=[0, 1, 2])
    ap.add_argument("--alp-std", type=float, default=1e-3, help="initial sigma of every layer")
    ap.add_argument("--alp-lr", type=float, default=0.01, help="learning rate of the log-scales")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="tether-alp-"))
    todo = [(SOURCE, name, BASE + flags, seed) for name, flags in methods(args.alp_std, args.alp_lr)
            if args.only is None or args.only in name for seed in args.seeds]
    run_and_print(todo, args, out, f"steps {args.steps}, seeds {args.seeds}, alp std {args.alp_std} lr {args.alp_lr}",
                  table)

if __name__ == "__main__":
    main()
