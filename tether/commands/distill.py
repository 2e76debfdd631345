"""``tether distill``: teacher -> student distillation (default: a CPU demo of on-policy distillation)."""

from __future__ import annotations

import argparse

from tether.configs import add_dataclass_arguments, config_from_args

NAME = "distill"
HELP = ("Distil a teacher into a student: opd, opsd, sft, pear, blackbox (default: on-policy distillation of a "
        "built-in teacher into a smaller student, CPU, a few minutes).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tether.distill.config import DistillConfig

    add_dataclass_arguments(p, DistillConfig)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from tether.distill.config import DistillConfig
    from tether.distill.loop import distill

    cfg = config_from_args(DistillConfig, args)
    s = distill(cfg)
    table = Table(title=f"tether distill: {s['algorithm']} / {s['objective']}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    before, after = s["eval/accuracy_before"], s["eval/accuracy_after"]
    table.add_row("student held-out accuracy", f"{before:.1%} -> {after:.1%}  ({after - before:+.1%})")
    if s["eval/teacher_accuracy"] is not None:
        table.add_row("teacher held-out accuracy", f"{s['eval/teacher_accuracy']:.1%}")
    table.add_row("params (student / teacher)", f"{s['student_params']:,} / " + (f"{s['teacher_params']:,}" if s['teacher_params'] else "-"))
    if "calibration/ece_before" in s:
        for prefix, what in (("sampled_", "sampled"), ("", "greedy")):
            c = {k: (s[f"calibration/{prefix}{k}_before"], s[f"calibration/{prefix}{k}_after"])
                 for k in ("ece", "confidence_mean", "accuracy")}
            table.add_row(f"calibration ECE ({what})", f"{c['ece'][0]:.3f} -> {c['ece'][1]:.3f}")
            table.add_row(f"stated confidence / accuracy ({what})",
                          f"{c['confidence_mean'][0]:.2f} / {c['accuracy'][0]:.2f} -> "
                          f"{c['confidence_mean'][1]:.2f} / {c['accuracy'][1]:.2f}")
    table.add_row("steps", str(s["steps"]))
    table.add_row("teacher tokens", f"{s['teacher_tokens']:,}")
    table.add_row("time", f"{s['time/total_s']:.1f} s")
    table.add_row("run directory", s["run_dir"])
    Console().print(table)
    return 0
