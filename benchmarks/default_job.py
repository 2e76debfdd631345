"""The default job against the classic one: time and held-out accuracy, side by side, interleaved.

``tether train`` (the default job: async one version ahead, int8 rollout engine, snapshot pi_old, TIS)
and ``tether train --classic`` (the synchronous fp32 GRPO job that was the default before issue 24) are
run for every seed, alternating which goes first (A B, B A, A B, ...), so a load that drifts during the
benchmark lands on both. Each run is a subprocess with the run's own defaults (no --steps or --threads
unless given); its wall time and CPU time (user + system of that child, from ``os.wait4``) are measured
around it, the load average is read before it. The warm starts are cached by the first run of a seed
(``--prewarm`` builds them first so no timed run includes one).

    python benchmarks/default_job.py --seeds 0 1 2 --out /tmp/default-job
    python benchmarks/default_job.py --explicit ...   # both jobs spelt out in flags (code before --classic)

Prints a table (mean ± sample standard deviation over the seeds, and every run) and writes
``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

JOBS = {"classic": ["--classic"], "default": []}
"""The two jobs as ``tether train`` flags."""
EXPLICIT = {"classic": ["--mode", "sync", "--rollout-precision", "fp32", "--objective", "grpo"],
            "default": ["--mode", "async", "--max-staleness", "1", "--old-logits", "snapshot",
                        "--rollout-precision", "int8", "--objective", "tis"]}
"""The same two jobs spelt out field by field (runs on code from before the default changed)."""


def start_job(name: str, flags: list[str], seed: int, out: Path, extra: list[str]) -> tuple[subprocess.Popen, dict]:
    """Start one ``tether train`` subprocess; returns it and its record so far."""
    run = out / f"{name}-{seed}"
    cmd = [sys.executable, "-m", "tether", "train", *flags, "--seed", str(seed), "--no-progress", "--overwrite",
           "--out", str(run), *extra]
    log = open(out / f"{name}-{seed}.log", "w")
    p = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log, stderr=subprocess.STDOUT)
    return p, {"job": name, "seed": seed, "run": str(run), "load_before": os.getloadavg()[0], "t0": time.perf_counter(),
               "command": " ".join(["tether", *cmd[3:]])}


def finish_jobs(started: list[tuple[subprocess.Popen, dict]]) -> list[dict]:
    """Wait for every started job, each timed when it ends (whichever ends first), and read their summaries."""
    by_pid = {p.pid: (p, rec) for p, rec in started}
    while by_pid:
        pid, status, usage = os.wait4(-1, 0)
        if pid in by_pid:
            p, rec = by_pid.pop(pid)
            _finish(p, rec, status, usage)
    return [rec for _, rec in started]


def _finish(p: subprocess.Popen, rec: dict, status: int, usage) -> None:
    """A job that ended: its wall time, its own CPU time (``wait4``'s rusage of that child) and its summary."""
    p.returncode = os.waitstatus_to_exitcode(status)
    rec["wall_s"] = time.perf_counter() - rec.pop("t0")
    rec["cpu_s"] = usage.ru_utime + usage.ru_stime
    if p.returncode != 0:
        raise SystemExit(f"{rec['command']} failed ({p.returncode}); see {rec['run']}.log")
    summary = json.loads((Path(rec["run"]) / "summary.json").read_text())
    rec.update({"rl_s": summary["time/total_s"], "step_s": summary["time/step_s_mean"],
                "acc_before": summary["eval/accuracy_before"], "acc_after": summary["eval/accuracy_after"],
                **{k: v for k, v in summary.items() if k.startswith(("mismatch/", "correction/"))}})


def _mean_sd(vals: list[float]) -> str:
    if not vals:
        return "-"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.3g} ± {sd:.2g}"


def table(rows: list[dict]) -> str:
    lines = ["| job | wall s | CPU s | RL s (summary) | s/step | accuracy before | accuracy after | runs |",
             "|---|---|---|---|---|---|---|---|"]
    for job in JOBS:
        rs = [r for r in rows if r["job"] == job]
        pct = [100 * r["acc_after"] for r in rs]
        lines.append(f"| {job} | {_mean_sd([r['wall_s'] for r in rs])} | {_mean_sd([r['cpu_s'] for r in rs])} | "
                     f"{_mean_sd([r['rl_s'] for r in rs])} | {_mean_sd([r['step_s'] for r in rs])} | "
                     f"{_mean_sd([100 * r['acc_before'] for r in rs])} % | {_mean_sd(pct)} % | {len(rs)} |")
    lines.append("")
    for r in rows:
        lines.append(f"- {r['job']} seed {r['seed']}: wall {r['wall_s']:.1f} s, CPU {r['cpu_s']:.1f} s, load "
                     f"{r['load_before']:.1f}, accuracy {100 * r['acc_before']:.1f} % -> {100 * r['acc_after']:.1f} %")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="/tmp/tether-default-job")
    ap.add_argument("--explicit", action="store_true", help="spell both jobs out in flags (no --classic)")
    ap.add_argument("--extra", default="", help="more flags for both jobs, e.g. '--steps 20'")
    ap.add_argument("--together", action="store_true", help="run a seed's two jobs at the same time (same load)")
    ap.add_argument("--prewarm", action="store_true", help="build every seed's warm start before timing")
    ap.add_argument("--table-only", action="store_true", help="run nothing: print the table of OUT/results.json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.table_only:
        print(table(json.loads((out / "results.json").read_text())))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    jobs = EXPLICIT if args.explicit else JOBS
    extra = args.extra.split()
    if args.prewarm:
        for seed in args.seeds:  # one step of the classic job caches the seed's warm start
            finish_jobs([start_job("prewarm", jobs["classic"], seed, out, ["--steps", "1", "--eval-size", "1"])])
    rows = []
    for i, seed in enumerate(args.seeds):
        order = list(jobs) if i % 2 == 0 else list(jobs)[::-1]
        if args.together:  # both jobs of a seed at once: the same load on both
            done = finish_jobs([start_job(name, jobs[name], seed, out, extra) for name in order])
        else:
            done = [rec for name in order for rec in finish_jobs([start_job(name, jobs[name], seed, out, extra)])]
        for rec in done:
            rows.append(rec)
            print(json.dumps(rec), flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
