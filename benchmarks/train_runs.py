"""The runner the off-policy benchmarks share: one ``tether train`` subprocess per run, read back.

A run is ``(source, method, flags, seed)``; its directory under ``out`` is named from the first
three, so ``reuse=True`` skips a run whose ``summary.json`` already exists (a benchmark can be
stopped and continued, or re-tabulated without running anything). ``read_run`` turns a run
directory into one flat record: held-out accuracy before / after, the meter's means over the run's
steps, seconds, samples/s and the collapse flag (``collapsed``, defined there).

Used by benchmarks/offpolicy.py and benchmarks/mismatch_stress.py (imported as a sibling module:
``benchmarks/`` is on ``sys.path`` when a script in it runs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

COLLAPSE_DROP = 0.10
"""A run collapsed when its held-out accuracy ends more than this (10 points) below its start ..."""
COLLAPSE_REWARD = 0.02
"""... or its mean training reward over the last quarter of steps is below this (reward gone to ~0)."""


def mean_of(rows: list[dict], key: str) -> float | None:
    """Mean of the numeric values of ``key`` over ``rows`` (None when no row has one)."""
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and r[key] == r[key]]
    return sum(vals) / len(vals) if vals else None


def run_dir(out: Path, source: str, method: str, seed: int) -> Path:
    name = f"{source}-{method}-{seed}"
    for bad in " /,()=+":
        name = name.replace(bad, "_")
    return out / name


def train_command(flags: list[str], seed: int, steps: int, run: Path, threads: int) -> list[str]:
    return [sys.executable, "-m", "tether", "train", "--steps", str(steps), "--seed", str(seed), "--threads",
            str(threads), "--no-progress", "--out", str(run), "--checkpoint-every", str(steps), *flags]


def read_run(run: Path) -> dict:
    """One finished run directory as a flat record (module docstring)."""
    summary = json.loads((run / "summary.json").read_text())
    config = json.loads((run / "config.json").read_text())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    before, after = summary["eval/accuracy_before"], summary["eval/accuracy_after"]
    last_reward = summary.get("reward/last_quarter")
    return {
        "acc_before": before, "acc_after": after,
        "reward_last_quarter": last_reward,
        "engine_abs_logr": mean_of(metrics, "meter/engine/abs_logr_mean"),
        "engine_kl_k3": mean_of(metrics, "meter/engine/kl_k3"),
        "total_abs_logr": mean_of(metrics, "meter/total/abs_logr_mean"),
        "total_kl_k3": mean_of(metrics, "meter/total/kl_k3"),
        "total_ess_token": mean_of(metrics, "meter/total/ess_token"),
        "staleness_kl_k3": mean_of(metrics, "meter/staleness/kl_k3"),
        "age_mean": mean_of(metrics, "meter/version/age_mean"),
        "step_s": summary["time/step_s_mean"],
        "old_logits_s": mean_of(metrics, "time/old_logits_s"),
        "old_logits_mb": (mean_of(metrics, "mem/old_logits_bytes") or 0) / 2**20,
        "samples_per_s": config["prompts_per_step"] * config["group_size"] * len(metrics) / summary["time/total_s"],
        "collapsed": after < before - COLLAPSE_DROP or (last_reward is not None and last_reward < COLLAPSE_REWARD),
    }


def run_one(source: str, method: str, flags: list[str], seed: int, *, steps: int, out: Path, threads: int,
            reuse: bool = False) -> dict:
    """Train once (unless ``reuse`` finds a summary) and return ``read_run``'s record with the run's labels."""
    run = run_dir(out, source, method, seed)
    label = {"source": source, "method": method, "seed": seed, "flags": flags}
    if not (reuse and (run / "summary.json").exists()):
        p = subprocess.run(train_command(flags, seed, steps, run, threads), cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
        if p.returncode != 0:
            return {**label, "error": p.stdout[-2000:] + p.stderr[-2000:]}
    return {**label, **read_run(run)}


def run_all(todo: Iterable[tuple[str, str, list[str], int]], *, steps: int, out: Path, threads: int, jobs: int,
            reuse: bool, table_only: bool = False) -> list[dict]:
    """``run_one`` over ``todo`` with ``jobs`` in parallel; ``table_only`` reads finished runs and runs nothing."""
    todo = list(todo)
    if table_only:
        return [{"source": s, "method": m, "seed": seed, "flags": f, **read_run(run_dir(out, s, m, seed))}
                for s, m, f, seed in todo if (run_dir(out, s, m, seed) / "summary.json").exists()]
    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(lambda t: run_one(*t, steps=steps, out=out, threads=threads, reuse=reuse), todo))


def add_run_options(ap: argparse.ArgumentParser, *, seeds: list[int]) -> None:
    """The command-line options every benchmark built on this runner takes."""
    ap.add_argument("--steps", type=int, default=40, help="RL steps per run")
    ap.add_argument("--seeds", type=int, nargs="+", default=seeds)
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--only", default=None, help="substring of the source names to run")
    ap.add_argument("--out", default=None, help="run directories (default: a temporary folder)")
    ap.add_argument("--reuse", action="store_true", help="runs whose directory has a summary are not rerun")
    ap.add_argument("--table-only", action="store_true", help="run nothing: tabulate the run directories in --out")


def write_report(out: Path, report: dict, text: str, json_path: str | None) -> None:
    """A benchmark's outputs: ``out/results.json`` (rows and runs), ``out/table.md``, and ``json_path`` if given."""
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "table.md").write_text(text + "\n")
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")


def accuracy_change(ok: list[dict]) -> str:
    """Held-out accuracy change of finished runs in points: ``mean ± sd (n=N: before->after per seed)``."""
    import statistics

    delta = [100 * (r["acc_after"] - r["acc_before"]) for r in ok]
    sd = statistics.stdev(delta) if len(delta) > 1 else 0.0
    per_seed = ", ".join(f"{100 * r['acc_before']:.1f}->{100 * r['acc_after']:.1f}" for r in ok)
    return f"{statistics.mean(delta):+.1f} ± {sd:.1f} (n={len(ok)}: {per_seed})"


def fmt(x, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def run_and_print(todo: list[tuple[str, str, list[str], int]], args: argparse.Namespace, out: Path, note: str,
                  table) -> None:
    """``run_all`` with a benchmark's ``add_run_options`` arguments; ``out/results.json`` (unless
    ``--table-only``), ``note`` and ``table(results, out)`` printed."""
    results = run_all(todo, steps=args.steps, out=out, threads=args.threads, jobs=args.jobs, reuse=args.reuse,
                      table_only=args.table_only)
    if not args.table_only:
        (out / "results.json").write_text(json.dumps(results, indent=2))
        print(f"{note}; runs in {out}")
    print(table(results, out))


def by_method(results: list[dict]) -> list[tuple[str, list[dict], str | None]]:
    """``(method, finished runs, None)`` per method in first-seen order, or ``(method, [], "| method | failed:
    ... |")`` (a table row) when none of its runs finished."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r["method"], []).append(r)
    out = []
    for method, rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        out.append((method, ok, None if ok else f"| {method} | failed: {rs[0]['error'][-200:]!r} |"))
    return out
