"""Distillation at an equal budget of teacher tokens: held-out accuracy, mean ± sd over seeds.

Teacher: the built-in tiny model (1.8 M parameters) warm-started for 1,500 steps; student: the same
architecture warm-started for 400 steps, one starting student for every method and seed (the seed
varies the run: prompts, sampling, data order). Every method stops once it has spent ``--budget``
teacher tokens (tokens the teacher generated, or scored on the student's samples; OPSD's teacher
is the student itself reading the reference solution, and its scored tokens count the same way).
The "+ RL" rows then run ``--rl-steps`` GRPO steps on the task reward (no teacher) with the RL
job's defaults (``tether train``: lr 2e-5, no warm-up, 8 completions per prompt); "RL only" runs
the same RL phase from the untouched student, the baseline those rows must beat. Accuracy is
greedy, on the task's held-out split.

    python benchmarks/distill.py [--seeds 0 1 2] [--budget 10000] [--rl-steps 40] [--threads 1]
        [--methods KEY ...] [--reuse RUNS.json ...] [--json OUT.json]

``--methods`` runs a subset (keys below; two processes with disjoint subsets share the cores);
``--reuse`` skips the (method, seed) pairs already in earlier raw runs and tables them all.
Prints a Markdown table (the one in docs/benchmarks.md) and writes the raw runs to --json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path

from tether.distill.config import Algorithm, DistillConfig, OPSDTeacher
from tether.distill.loop import distill
from tether.train.config import TrainConfig

RL_DEFAULTS = {f.name: f.default for f in fields(TrainConfig) if f.name in ("lr", "group_size", "warmup_steps")}
"""The RL job's own defaults, used by the RL phase of the "+ RL" rows."""


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    algorithm: Algorithm
    objective: str | None = None
    objective_args: dict | None = None
    then_rl: bool = False
    options: dict | None = None
    """Other DistillConfig fields of the run."""
    budget: bool = True
    """False: no teacher phase at all (the RL-only baseline)."""


METHODS = [
    Method("opd", "OPD, reverse KL, sampled token", Algorithm.OPD, "opd"),
    Method("rkl", "OPD, reverse KL, full vocabulary", Algorithm.OPD, "distill_reverse_kl"),
    Method("rkl-top4", "OPD, reverse KL, teacher top-4 + tail", Algorithm.OPD, "distill_reverse_kl",
           {"support": "topk_teacher", "k": 4}),
    Method("fkl", "OPD, forward KL, full vocabulary", Algorithm.OPD, "distill_forward_kl"),
    Method("jsd", "OPD, JSD beta 0.5, full vocabulary", Algorithm.OPD, "distill_jsd", {"beta": 0.5}),
    Method("tv", "OPD, total variation, full vocabulary", Algorithm.OPD, "distill_tv"),
    Method("opsd", "OPSD, fixed self-teacher + reference solution, JSD beta 0.5", Algorithm.OPSD),
    Method("opsd-ema", "OPSD, EMA self-teacher (decay 0.999) + reference solution, JSD beta 0.5", Algorithm.OPSD,
           options={"opsd_teacher": OPSDTeacher.EMA}),
    Method("blackbox", "Black-box teacher (text only), sequence similarity reward, GRPO", Algorithm.BLACKBOX),
    Method("sft", "SFT on teacher samples", Algorithm.SFT, "sft"),
    Method("pear", "PEAR (token suffix) on teacher samples", Algorithm.PEAR, "pear"),
    Method("rl", "RL phase only (no teacher), from the untouched student", Algorithm.RL, budget=False),
    Method("sft-rl", "SFT on teacher samples, then the RL phase", Algorithm.SFT, "sft", then_rl=True),
    Method("pear-rl", "PEAR (token suffix), then the RL phase", Algorithm.PEAR, "pear", then_rl=True),
]
BY_KEY = {m.key: m for m in METHODS}


def run_one(m: Method, seed: int, args, out: Path) -> dict:
    t0 = time.perf_counter()
    common = dict(seed=seed, threads=args.threads, progress=False, eval_size=args.eval_size)
    rl = dict(algorithm=Algorithm.RL, steps=args.rl_steps, lr=args.rl_lr, group_size=args.rl_group_size,
              warmup_steps=RL_DEFAULTS["warmup_steps"], **common)
    if not m.budget:  # the RL phase alone
        s = distill(DistillConfig(out=str(out), **rl))
        acc, before_rl, teacher_tokens, steps = s["eval/accuracy_after"], None, 0, 0
    else:
        s = distill(DistillConfig(algorithm=m.algorithm, objective=m.objective, objective_args=m.objective_args,
                                  steps=10_000, teacher_token_budget=args.budget, out=str(out), **common,
                                  **(m.options or {})))
        acc, before_rl, teacher_tokens, steps = s["eval/accuracy_after"], None, s["teacher_tokens"], s["steps"]
        if m.then_rl:
            r = distill(DistillConfig(init=str(out / "student.pt"), out=str(out) + "-rl", **rl))
            acc, before_rl = r["eval/accuracy_after"], acc
    return {"method": m.label, "key": m.key, "seed": seed, "accuracy": acc, "accuracy_before_rl": before_rl,
            "student_start": s["eval/accuracy_before"], "teacher": s["eval/teacher_accuracy"],
            "teacher_tokens": teacher_tokens, "steps": steps, "rl_steps": args.rl_steps if m.then_rl or not m.budget
            else 0, "seconds": time.perf_counter() - t0}


def run(args) -> list[dict]:
    rows = [r for path in args.reuse for r in json.loads(Path(path).read_text())]
    done = {(r["method"], r["seed"]) for r in rows}
    root = Path(tempfile.mkdtemp(prefix="tether-distill-bench-"))
    for seed in args.seeds:
        for key in args.methods:
            m = BY_KEY[key]
            if (m.label, seed) in done:
                continue
            row = run_one(m, seed, args, root / f"{seed}-{key}")
            rows.append(row)
            print(json.dumps(row), flush=True)
    labels = {m.label for m in METHODS}
    return [r for r in rows if r["method"] in labels and r["seed"] in args.seeds]


def table(rows: list[dict]) -> str:
    def ms(xs):
        return f"{100 * statistics.mean(xs):.1f} ± {100 * statistics.stdev(xs) if len(xs) > 1 else 0.0:.1f}"

    lines = ["| method | held-out accuracy % | before the RL phase % | teacher tokens | optimiser steps |",
             "|---|---|---|---|---|"]
    first = [r for r in rows if r["method"] == METHODS[0].label]
    if first:
        lines.append(f"| student before (warm start only) | {ms([r['student_start'] for r in first])} | | 0 | 0 |")
        lines.append(f"| teacher | {ms([r['teacher'] for r in first])} | | - | - |")
    for m in METHODS:
        sel = [r for r in rows if r["method"] == m.label]
        if sel:
            tok = statistics.mean(r["teacher_tokens"] for r in sel)
            steps = statistics.mean(r["steps"] for r in sel)
            rl_steps = statistics.mean(r.get("rl_steps", 0) for r in sel)
            pre = [r["accuracy_before_rl"] for r in sel if r.get("accuracy_before_rl") is not None]
            n = f"{steps:.0f}" + (f" + {rl_steps:.0f} RL" if rl_steps else "")
            lines.append(f"| {m.label} | {ms([r['accuracy'] for r in sel])} | {ms(pre) if pre else ''} | "
                         f"{tok:,.0f} | {n} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budget", type=int, default=10_000, help="teacher tokens per method")
    ap.add_argument("--rl-steps", type=int, default=40, help="GRPO steps of the RL phase")
    ap.add_argument("--rl-lr", type=float, default=RL_DEFAULTS["lr"], help="RL phase lr (default: the RL job's)")
    ap.add_argument("--rl-group-size", type=int, default=RL_DEFAULTS["group_size"],
                    help="RL phase completions per prompt (default: the RL job's)")
    ap.add_argument("--methods", nargs="+", default=[m.key for m in METHODS], choices=[m.key for m in METHODS])
    ap.add_argument("--reuse", nargs="*", default=[], help="raw runs (--json of earlier runs) to keep, not re-run")
    ap.add_argument("--eval-size", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the raw runs here")
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    print(table(rows))
    print(f"seeds {args.seeds}, budget {args.budget} teacher tokens, RL phase {args.rl_steps} steps at lr "
          f"{args.rl_lr:g}, {args.rl_group_size} per prompt, {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
