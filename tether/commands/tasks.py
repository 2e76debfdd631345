"""``tether tasks``: list the built-in tasks, show examples of a task, or check a dataset file."""

from __future__ import annotations

import argparse

NAME = "tasks"
HELP = "List the built-in tasks, or show examples of one / check a dataset file (.jsonl, .csv)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", nargs="?", help="a built-in task name or a dataset file to load and check")
    p.add_argument("--reward", default=None, help="reward for a dataset file: exact_match, numeric or module:function")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip and count bad rows instead of failing")
    p.add_argument("--model", default="tiny", help="the model the data is for: 'tiny' (the default) checks that the "
                   "built-in tokenizer can encode every prompt, answer and solution; other models: valid text only")
    p.add_argument("--show", type=int, default=3, help="how many training and evaluation examples to print")
    p.add_argument("--seed", type=int, default=0, help="seed of the printed training examples")


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import random

    from tether.tasks.registry import BUILTIN_TASKS, get_task
    from tether.train.setup import builtin_text_check

    if not args.task:
        width = max(len(n) for n in BUILTIN_TASKS)
        for name in sorted(BUILTIN_TASKS):
            spec = BUILTIN_TASKS[name]
            print(f"{name:<{width}}  {spec.description}")
            fields = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(spec.config_cls))
            print(f"{'':<{width}}  options: {fields}")
        print("or a dataset file: tether tasks data.jsonl --reward numeric (see docs/tasks.md)")
        return 0
    task = get_task(args.task, reward=args.reward, skip_bad_rows=args.skip_bad_rows or None,
                    text_check=builtin_text_check(args.model))
    rng = random.Random(args.seed)
    evals = task.eval_examples()
    print(f"task {task.name}: {len(evals)} evaluation examples")
    print(expert_report(task))
    if task.n_skipped:
        print(f"skipped {task.n_skipped} bad rows: {task.skipped_by_reason}")
        for e in getattr(task, "skipped", [])[:5]:
            print(f"  {e}")
    for label, examples in (("train", [task.sample(rng) for _ in range(args.show)]), ("eval", evals[: args.show])):
        for ex in examples:
            print(f"  [{label}] prompt={ex.prompt!r} answer={ex.answer!r} solution={ex.solution!r}")
    return 0


def expert_report(task) -> str:
    """One line: whether the task's training examples carry expert solutions (needed by the presets
    that train on expert rows, e.g. calibrl and rl_plus)."""
    from tether.train.requirements import expert_presets

    names = ", ".join(expert_presets())
    n = getattr(task, "n_expert_solutions", None)
    if n is None:
        ok = bool(getattr(task, "has_expert_solutions", False))
        return f"expert solutions: {'every problem' if ok else 'none'} ({names} {'can' if ok else 'cannot'} train)"
    total = len(task.train_examples())
    verdict = f"{names} can train" if n == total else f"{names} need one on every training row"
    return f"expert solutions: {n} of {total} training rows ({verdict})"
