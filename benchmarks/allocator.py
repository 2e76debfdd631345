"""malloc on a training step: glibc vs jemalloc vs tcmalloc (``LD_PRELOAD``), same job, same process shape.

Each contender runs in its own child process (a preload must be there from process start) with
``TETHER_MALLOC=system`` so nothing else swaps the allocator; children run round-robin
(``--rounds`` rounds of one child per allocator) so machine load hits all alike. A child runs the
real ``tether.train.sync.train`` loop on the built-in tiny model (no warm start) for ``--steps``
steps and reports the median step time and update-phase time over the steps after the first two,
plus minor page faults and CPU time per step. Allocators that are not installed are skipped.

    python benchmarks/allocator.py [--rounds 3] [--steps 8] [--prompts 16] [--generations 8] [--new-tokens 12] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(args) -> None:
    import resource

    import torch

    from tether.train import sync
    from tether.train.config import TrainConfig
    from tether.train.metrics_log import read_metrics

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        cfg = TrainConfig.from_flat(warmstart_steps=0, steps=args.steps, seed=0, prompts_per_step=args.prompts,
                          group_size=args.generations, max_new_tokens=args.new_tokens, eval_size=1,
                          checkpoint_every=10**6, out=d, progress=False, threads=args.threads)
        marks = []  # (minor faults, CPU time) at the end of every step: the loop writes one metrics line per step
        real_write = sync.MetricsLog.write

        def write(self, metrics):
            real_write(self, metrics)
            marks.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()))

        sync.MetricsLog.write = write
        sync.train(cfg)
        rows = read_metrics(Path(d) / "metrics.jsonl")[2:]
    (f0, c0), (f1, c1) = marks[1], marks[-1]  # from the end of step 1 to the end of the last step
    n = len(marks) - 2
    print(json.dumps({
        "step_s": statistics.median(r["time/step_s"] for r in rows),
        "update_s": statistics.median(r["time/update_s"] for r in rows),
        "minflt_per_step": (f1 - f0) / n,
        "cpu_s_per_step": (c1 - c0) / n,
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    from tether.allocator import find_malloc

    libs = {"glibc": None, **{name: find_malloc(name) for name in ("jemalloc", "tcmalloc")}}
    missing = [k for k, v in libs.items() if k != "glibc" and v is None]
    libs = {k: v for k, v in libs.items() if k == "glibc" or v is not None}
    child_argv = [sys.executable, __file__, "--child", "--steps", str(args.steps), "--prompts", str(args.prompts),
                  "--generations", str(args.generations), "--new-tokens", str(args.new_tokens),
                  "--threads", str(args.threads)]
    results: dict[str, list[dict]] = {k: [] for k in libs}
    for _ in range(args.rounds):
        for name, lib in libs.items():
            env = {**os.environ, "TETHER_MALLOC": "system", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
            env.pop("LD_PRELOAD", None)
            if lib:
                env["LD_PRELOAD"] = lib
            out = subprocess.run(child_argv, env=env, capture_output=True, text=True, check=True).stdout
            results[name].append(json.loads(out.strip().splitlines()[-1]))
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in results.items()}
    print(f"training step, {args.prompts} prompts x {args.generations} generations x <= {args.new_tokens} tokens, "
          f"threads {args.threads}, median of {args.rounds} interleaved runs x {args.steps - 2} steps"
          + (f" (not installed: {', '.join(missing)})" if missing else ""))
    base = med["glibc"]["step_s"]
    print(f"{'malloc':>9} | {'step ms':>8} | {'update ms':>9} | {'CPU ms/step':>11} | {'minor faults/step':>17} | vs glibc")
    for name, m in med.items():
        print(f"{name:>9} | {m['step_s'] * 1e3:8.1f} | {m['update_s'] * 1e3:9.1f} | {m['cpu_s_per_step'] * 1e3:11.1f} | "
              f"{m['minflt_per_step']:17.0f} | {base / m['step_s']:.2f}x")


if __name__ == "__main__":
    main()
