"""FAKER-Air's class-wise recipe against plain GRPO on a task with graded numeric answers (issue 19 item 4).

Task: products ``a*b=`` (a in 1..40, b in 1..9, answers 1..360) written to ``out/products.jsonl``, binned into
four classes at 0/40/80/160 with classes 2-3 (products >= 80) 'high'; 60 of the 360 rows are held out. The
classic job (sync, GRPO, fp32 engine) on the built-in tiny model with a short warm start (``--warmstart-steps``,
default 100: too short to memorise the answers, so neither the exact number nor its class is solved), ``--steps`` RL steps, one ``tether train`` subprocess per run
(benchmarks/train_runs.py). Methods:

    grpo-numeric   plain GRPO on the exact-number reward (``--reward numeric``)
    grpo-class     GRPO on the class-wise reward (coarse 0.5, exact 0.5, false-alarm penalty 0.5), no constraints
    faker          the class-wise reward with its PI-controlled recall-floor / false-alarm terms, the rank_ema
                   advantage and the PI-controlled KL coefficient (kl_placement loss, target 1e-3)

Reported per method: held-out greedy accuracy change on the exact-number reward (every run's evaluation uses
the task's reward), and for the class-wise methods the training recall and false-alarm ratio over the first and
last quarter of steps (the plain run does not bin its answers, so it has no such column).

    python benchmarks/classwise.py [--steps 40] [--seeds 0 1 2] [--jobs 3] [--warmstart-steps 100] [--out DIR [--reuse]]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from train_runs import accuracy_change, add_run_options, by_method, fmt, mean_of, run_and_print, run_dir

SOURCE = "products"
CLASS = ["--class-bounds", "0,40,80,160,361", "--class-fa-penalty", "0.5"]


def methods() -> list[tuple[str, list[str]]]:
    return [
        ("grpo-numeric", []),
        ("grpo-class", [*CLASS, "--no-class-constraints"]),
        ("faker", [*CLASS, "--advantage", "rank_ema", "--kl-placement", "loss", "--kl-estimator", "k3plus",
                   "--kl-coef", "0.001", "--kl-target", "0.001"]),
    ]


def write_task(out: Path) -> Path:
    path = out / "products.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{a}*{b}=", "answer": str(a * b)}) + "\n"
                            for a in range(1, 41) for b in range(1, 10)))
    return path


def quarters(out: Path, method: str, seed: int, key: str) -> tuple[float | None, float | None]:
    rows = [json.loads(x) for x in (run_dir(out, SOURCE, method, seed) / "metrics.jsonl").read_text().splitlines()]
    q = max(1, len(rows) // 4)
    return mean_of(rows[:q], key), mean_of(rows[-q:], key)


def table(results: list[dict], out: Path) -> str:
    lines = ["| method | held-out exact-answer acc change, points (mean ± sd; per seed before->after) | "
             "train recall, first -> last quarter | train false-alarm ratio, first -> last quarter | s/step |",
             "|---|---|---|---|---|"]
    for method, ok, failed in by_method(results):
        if failed:
            lines.append(failed)
            continue
        cols = []
        for key in ("class/recall", "class/far"):
            qs = [quarters(out, method, r["seed"], key) for r in ok]
            firsts, lasts = [a for a, _ in qs if a is not None], [b for _, b in qs if b is not None]
            cols.append(f"{fmt(sum(firsts) / len(firsts))} -> {fmt(sum(lasts) / len(lasts))}" if firsts else "-")
        lines.append(f"| {method} | {accuracy_change(ok)} | {cols[0]} | {cols[1]} | "
                     f"{sum(r['step_s'] for r in ok) / len(ok):.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_options(ap, seeds=[0, 1, 2])
    ap.add_argument("--warmstart-steps", type=int, default=100, help="SFT steps of the built-in model before RL")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="tether-classwise-"))
    out.mkdir(parents=True, exist_ok=True)
    base = ["--classic", "--task", str(write_task(out)), "--reward", "numeric", "--warmstart-steps",
            str(args.warmstart_steps), "--eval-size", "60", "--no-plots"]
    todo = [(SOURCE, name, base + flags, seed) for name, flags in methods()
            if args.only is None or args.only in name for seed in args.seeds]
    run_and_print(todo, args, out, f"steps {args.steps}, seeds {args.seeds}, warm start {args.warmstart_steps}", table)

if __name__ == "__main__":
    main()
