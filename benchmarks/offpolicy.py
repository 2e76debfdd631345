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
import os
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
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


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return sum(vals) / len(vals) if vals else None


def _run_dir(out: Path, source: str, correction: str, flags: list[str], seed: int) -> Path:
    return out / f"{source}-{correction}-{seed}".replace(" ", "_").replace("/", "_").replace(",", "")


def run_one(source: str, correction: str, flags: list[str], seed: int, steps: int, out: Path, threads: int,
            reuse: bool = False) -> dict:
    run = _run_dir(out, source, correction, flags, seed)
    cmd = [sys.executable, "-m", "tether", "train", "--steps", str(steps), "--seed", str(seed), "--threads",
           str(threads), "--no-progress", "--out", str(run), "--checkpoint-every", str(steps), *flags]
    if not (reuse and (run / "summary.json").exists()):
        p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
        if p.returncode != 0:
            return {"source": source, "correction": correction, "seed": seed,
                    "error": p.stdout[-2000:] + p.stderr[-2000:]}
    summary = json.loads((run / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    batch = 16 * 8
    return {
        "source": source, "correction": correction, "seed": seed,
        "acc_before": summary["eval/accuracy_before"], "acc_after": summary["eval/accuracy_after"],
        "engine_abs_logr": _mean(metrics, "meter/engine/abs_logr_mean"),
        "engine_kl_k3": _mean(metrics, "meter/engine/kl_k3"),
        "total_abs_logr": _mean(metrics, "meter/total/abs_logr_mean"),
        "total_ess_token": _mean(metrics, "meter/total/ess_token"),
        "staleness_kl_k3": _mean(metrics, "meter/staleness/kl_k3"),
        "age_mean": _mean(metrics, "meter/version/age_mean"),
        "step_s": summary["time/step_s_mean"],
        "old_logits_s": _mean(metrics, "time/old_logits_s"),
        "old_logits_mb": (_mean(metrics, "mem/old_logits_bytes") or 0) / 2**20,
        "samples_per_s": batch * len(metrics) / summary["time/total_s"],
        "collapsed": summary["eval/accuracy_after"] < summary["eval/accuracy_before"] - 0.10,
    }


def fmt(x, spec=".3g") -> str:
    return "-" if x is None else format(x, spec)


def table(results: list[dict]) -> str:
    head = ("| source | correction | held-out acc change, points (mean ± sd; per seed before->after) | engine abs log-ratio | "
            "total abs log-ratio | total ESS | staleness KL | s/step | old-logit s/step | old-logit MB | samples/s |")
    lines = [head, "|" + "---|" * 11]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["source"], r["correction"]), []).append(r)
    for (source, corr), rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            lines.append(f"| {source} | {corr} | failed: {rs[0]['error'][-200:]!r} |")
            continue
        delta = [100 * (r["acc_after"] - r["acc_before"]) for r in ok]
        sd = statistics.stdev(delta) if len(delta) > 1 else 0.0
        per_seed = ", ".join(f"{100 * r['acc_before']:.1f}->{100 * r['acc_after']:.1f}" for r in ok)
        acc = f"{statistics.mean(delta):+.1f} ± {sd:.1f} (n={len(ok)}: {per_seed})"
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
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--only", default=None, help="substring of the source names to run")
    ap.add_argument("--out", default=None, help="run directories (default: a temporary folder)")
    ap.add_argument("--reuse", action="store_true", help="rows whose run directory has a summary are not rerun")
    ap.add_argument("--table-only", action="store_true", help="run nothing: tabulate the run directories in --out")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="tether-offpolicy-"))
    rows = [r for r in ROWS if args.only is None or args.only in r[0]]
    todo = [(s, c, f, seed) for s, c, f in rows for seed in args.seeds]
    if args.table_only:
        results = [run_one(*t, args.steps, out, args.threads, True) for t in todo
                   if (_run_dir(out, *t) / "summary.json").exists()]
        print(table(results))
        return
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda t: run_one(*t, args.steps, out, args.threads, args.reuse), todo))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"steps {args.steps}, seeds {args.seeds}; runs in {out}")
    print(table(results))


if __name__ == "__main__":
    main()
