"""Weak-to-strong drafts (issue 19 item 3) against plain Dr.GRPO at tiny scale.

The classic job (built-in tiny model warm-started 400 steps on 1-2 digit addition, 16 prompts x 8, lr 2e-5, sync,
fp32) with ``--objective dr_grpo``, ``--steps`` RL steps per run, one ``tether train`` subprocess per run
(benchmarks/train_runs.py). Methods: ``plain`` (no draft) and the four ``--drafts`` variants. Evaluation is always
on plain prompts (200 held-out problems, greedy), so the accuracy change is what the paper measures (no draft at
test time). Also reported: the mean training reward over the last quarter of steps (on draft-augmented prompts).

    python benchmarks/drafts.py [--steps 20] [--seeds 0 1] [--jobs 2] [--out DIR [--reuse]]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from train_runs import (  # benchmarks/ on sys.path
    accuracy_change,
    add_run_options,
    by_method,
    fmt,
    run_and_print,
)

SOURCE = "drafts"
BASE = ["--objective", "dr_grpo"]
METHODS = [("plain", []), *[(v, ["--drafts", v]) for v in
                             ("matched-correct", "matched-wrong", "mismatched-correct", "mismatched-wrong")]]


def table(results: list[dict], out: Path) -> str:
    lines = ["| method | held-out acc change, points (mean ± sd; per seed before->after) | train reward, last quarter "
             "| s/step |", "|---|---|---|---|"]
    for method, ok, failed in by_method(results):
        if failed:
            lines.append(failed)
            continue
        reward = [r["reward_last_quarter"] for r in ok if r["reward_last_quarter"] is not None]
        lines.append(f"| {method} | {accuracy_change(ok)} | {fmt(statistics.mean(reward) if reward else None)} | "
                     f"{statistics.mean(r['step_s'] for r in ok):.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_options(ap, seeds=[0, 1])
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="tether-drafts-"))
    todo = [(SOURCE, name, BASE + flags, seed) for name, flags in METHODS
            if args.only is None or args.only in name for seed in args.seeds]
    run_and_print(todo, args, out, f"steps {args.steps}, seeds {args.seeds}", table)


if __name__ == "__main__":
    main()
