"""Each mismatch source produced on purpose on a CPU, trained through with a few corrections.

The default job (built-in tiny model warm-started 400 steps, 1-2 digit addition, 16 prompts x 8,
lr 2e-5) for ``--steps`` RL steps per row; one ``tether train`` subprocess per row. Sources:

    staleness   --mode async, engine ``lag`` versions behind (k = lag, staleness policy wait),
                old logits by recompute / snapshot / loglinear / ewma
    precision   rollout engine bf16 or int8-weight, trainer fp32 (split), or both sides reduced (unified)
    sampling    top-p 0.9 at rollout, with and without replaying the truncation in the trainer

Reported per row: held-out greedy accuracy before -> after (200 problems), the meter's means over the
run (engine |log pi_old/mu|, total token ESS, staleness KL when snapshots make it exact), seconds per
step, the old-logit strategy's extra seconds per step and extra bytes, samples/s.

    python benchmarks/offpolicy.py [--steps 40] [--seeds 0] [--jobs 2] [--only 'lag 2'] [--out DIR [--reuse]]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from train_runs import (  # benchmarks/ is on sys.path when the script runs
    accuracy_change,
    add_run_options,
    fmt,
    run_all,
)

ASYNC = ["--mode", "async"]
ROWS: list[tuple[str, str, list[str]]] = [
    ("none", "grpo", []),
    ("lag 0 (async machinery)", "grpo", ASYNC + ["--max-staleness", "0"]),
    ("lag 2", "grpo (recompute)", ASYNC + ["--max-staleness", "2"]),
    ("lag 2", "tis (recompute)", ASYNC + ["--max-staleness", "2", "--objective", "tis"]),
    ("lag 2", "decoupled_ppo + snapshot", ASYNC + ["--max-staleness", "2", "--objective", "decoupled_ppo",
                                                   "--old-logits", "snapshot"]),
    ("lag 2", "decoupled_ppo + loglinear", ASYNC + ["--max-staleness", "2", "--objective", "decoupled_ppo",
                                                    "--old-logits", "loglinear"]),
    ("lag 2", "ppo_ewma + ewma", ASYNC + ["--max-staleness", "2", "--objective", "ppo_ewma", "--old-logits", "ewma"]),
    ("lag 8", "grpo (recompute)", ASYNC + ["--max-staleness", "8"]),
    ("lag 8", "decoupled_ppo + snapshot", ASYNC + ["--max-staleness", "8", "--objective", "decoupled_ppo",
                                                   "--old-logits", "snapshot"]),
    ("bf16 rollout", "grpo", ["--rollout-precision", "bf16"]),
    ("bf16 rollout", "tis", ["--rollout-precision", "bf16", "--objective", "tis"]),
    ("bf16 unified", "grpo", ["--rollout-precision", "bf16", "--unified-precision"]),
    ("int8 rollout", "grpo", ["--rollout-precision", "int8"]),
    ("int8 rollout", "tis", ["--rollout-precision", "int8", "--objective", "tis"]),
    ("int8 rollout", "icepop", ["--rollout-precision", "int8", "--objective", "icepop"]),
    ("int8 unified", "grpo", ["--rollout-precision", "int8", "--unified-precision"]),
    ("top-p 0.9, no replay", "grpo", ["--top-p", "0.9", "--no-replay-truncation"]),
    ("top-p 0.9, no replay", "tis", ["--top-p", "0.9", "--no-replay-truncation", "--objective", "tis"]),
    ("top-p 0.9, replay", "grpo", ["--top-p", "0.9"]),
]


def table(results: list[dict]) -> str:
    head = ("| source | correction | held-out acc change, points (mean ± sd; per seed before->after) | engine abs log-ratio | "
            "total abs log-ratio | total ESS | staleness KL | s/step | old-logit s/step | old-logit MB | samples/s |")
    lines = [head, "|" + "---|" * 11]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["source"], r["method"]), []).append(r)
    for (source, corr), rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            lines.append(f"| {source} | {corr} | failed: {rs[0]['error'][-200:]!r} |")
            continue
        acc = accuracy_change(ok)
        m = {k: statistics.mean([r[k] for r in ok if r[k] is not None]) if any(r[k] is not None for r in ok) else None
             for k in ("engine_abs_logr", "total_abs_logr", "total_ess_token", "staleness_kl_k3", "step_s", "old_logits_s",
                       "old_logits_mb", "samples_per_s")}
        lines.append(f"| {source} | {corr} | {acc} | {fmt(m['engine_abs_logr'])} | {fmt(m['total_abs_logr'])} | "
                     f"{fmt(m['total_ess_token'], '.4f')} | "
                     f"{fmt(m['staleness_kl_k3'])} | {fmt(m['step_s'], '.2f')} | {fmt(m['old_logits_s'], '.3f')} | "
                     f"{fmt(m['old_logits_mb'], '.1f')} | {fmt(m['samples_per_s'], '.0f')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_options(ap, seeds=[0])
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="tether-offpolicy-"))
    rows = [r for r in ROWS if args.only is None or args.only in r[0]]
    todo = [(s, c, f, seed) for s, c, f in rows for seed in args.seeds]
    results = run_all(todo, steps=args.steps, out=out, threads=args.threads, jobs=args.jobs, reuse=args.reuse,
                      table_only=args.table_only)
    if args.table_only:
        print(table(results))
        return
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"steps {args.steps}, seeds {args.seeds}; runs in {out}")
    print(table(results))


if __name__ == "__main__":
    main()
