"""Distillation at an equal budget of teacher tokens: held-out accuracy, mean ± sd over seeds.

Teacher: the built-in tiny model (1.8 M parameters) warm-started for 1,500 steps; student: the same
architecture warm-started for 400 steps, one starting student for every method and seed (the seed
varies the run: prompts, sampling, data order). Every method stops once it has spent ``--budget`` teacher tokens (tokens the teacher
generated, or scored on the student's samples); the "+ RL" rows then run the same ``--rl-steps``
GRPO steps on the task reward (no teacher). Accuracy is greedy, on the task's held-out split.

    python benchmarks/distill.py [--seeds 0 1 2] [--budget 10000] [--rl-steps 20] [--threads 1]

Prints a Markdown table (the one in docs/benchmarks.md) and writes the raw runs to --json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from tether.distill.config import Algorithm, DistillConfig
from tether.distill.loop import distill

METHODS = [
    # (label, algorithm, objective, objective_args, then RL)
    ("OPD, reverse KL, sampled token", Algorithm.OPD, "opd", None, False),
    ("OPD, reverse KL, full vocabulary", Algorithm.OPD, "distill_reverse_kl", None, False),
    ("OPD, reverse KL, teacher top-4 + tail", Algorithm.OPD, "distill_reverse_kl",
     {"support": "topk_teacher", "k": 4}, False),
    ("SFT on teacher samples", Algorithm.SFT, "sft", None, False),
    ("PEAR (token suffix) on teacher samples", Algorithm.PEAR, "pear", None, False),
    ("SFT on teacher samples + RL", Algorithm.SFT, "sft", None, True),
    ("PEAR (token suffix) + RL", Algorithm.PEAR, "pear", None, True),
]


def run(args) -> list[dict]:
    rows = []
    root = Path(tempfile.mkdtemp(prefix="tether-distill-bench-"))
    for seed in args.seeds:
        for label, algo, objective, oargs, then_rl in METHODS:
            t0 = time.perf_counter()
            out = root / f"{seed}-{len(rows)}"
            common = dict(seed=seed, threads=args.threads, progress=False, eval_size=args.eval_size)
            s = distill(DistillConfig(algorithm=algo, objective=objective, objective_args=oargs, steps=10_000,
                                      teacher_token_budget=args.budget, out=str(out), **common))
            acc = s["eval/accuracy_after"]
            if then_rl:
                r = distill(DistillConfig(algorithm=Algorithm.RL, steps=args.rl_steps, init=str(out / "student.pt"),
                                          out=str(out) + "-rl", **common))
                acc = r["eval/accuracy_after"]
            row = {"method": label, "seed": seed, "accuracy": acc, "student_start": s["eval/accuracy_before"],
                   "teacher": s["eval/teacher_accuracy"], "teacher_tokens": s["teacher_tokens"], "steps": s["steps"],
                   "seconds": time.perf_counter() - t0}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    def ms(xs):
        return f"{100 * statistics.mean(xs):.1f} ± {100 * statistics.stdev(xs) if len(xs) > 1 else 0.0:.1f}"

    lines = ["| method | held-out accuracy % | teacher tokens | optimiser steps |", "|---|---|---|---|"]
    start = [r["student_start"] for r in rows if r["method"] == METHODS[0][0]]
    teacher = [r["teacher"] for r in rows if r["method"] == METHODS[0][0]]
    lines.append(f"| student before (warm start only) | {ms(start)} | 0 | 0 |")
    lines.append(f"| teacher | {ms(teacher)} | - | - |")
    for label, *_ in METHODS:
        sel = [r for r in rows if r["method"] == label]
        if sel:
            tok = statistics.mean(r["teacher_tokens"] for r in sel)
            steps = statistics.mean(r["steps"] for r in sel)
            lines.append(f"| {label} | {ms([r['accuracy'] for r in sel])} | {tok:,.0f} | {steps:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budget", type=int, default=10_000, help="teacher tokens per method")
    ap.add_argument("--rl-steps", type=int, default=20)
    ap.add_argument("--eval-size", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the raw runs here")
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    print(table(rows))
    print(f"seeds {args.seeds}, budget {args.budget} teacher tokens, RL steps {args.rl_steps}, "
          f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
