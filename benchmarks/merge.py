"""Merging two RL-trained tiny policies: held-out accuracy of each source, plain averaging, RAM and RAM+.

Per seed: a base model (the built-in tiny architecture at ``--d-model`` / ``--layers``, default 96 / 2, about
0.2 M parameters, small enough for a loaded 2-core machine; SFT-warm-started for ``--base-steps`` on 1-2 digit
arithmetic with both ``+`` and ``-``) is written as a model folder; two policies are RL-trained from
it with ``tether train`` (GRPO, ``--lr``, ``--prompts`` x 8 completions, the job's defaults otherwise) for
``--rl-steps`` each, one on addition only
(``ops "+"``), one on subtraction only (``ops "-"``), and exported; ``tether merge``'s code
(``merge_folders``) merges them with ``average``, ``ram`` and ``ram-plus``. Every model (base, both sources,
three merges) is evaluated greedily on the held-out split of both tasks (``--eval-size`` problems each).

Each seed is merged and evaluated twice from the same trained models: as fp32 checkpoints, and rounded to
bfloat16 (base and sources), as the paper's RL checkpoints are stored: an update smaller than bfloat16's
resolution at a weight leaves it bit-identical, which is where the sparse task vectors RAM is built for come
from; fp32 keeps every update.

    python benchmarks/merge.py [--seeds 0 1 2] [--base-steps 1000] [--rl-steps 30] [--lr 2e-5] [--prompts 16] [--eval-size 100]
        [--precision fp32 bf16] [--threads 2] [--json OUT.json]
    python benchmarks/merge.py --table RUN.json ...   # one table of earlier runs (e.g. one seed each)

Prints a Markdown table (mean ± sample sd over seeds, accuracy in %) and the shared/unique fractions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tether.merge.config import MergeConfig
from tether.merge.run import merge_folders
from tether.train.config import TrainConfig

TASKS = {"add": {"max_digits": 2, "ops": "+"}, "sub": {"max_digits": 2, "ops": "-"}}
BASE_TASK = {"max_digits": 2, "ops": "+-"}
METHODS = ("average", "ram", "ram-plus")


def build_base(seed: int, args: argparse.Namespace, out: Path) -> Path:
    from tether.models.builtin import warm_started_tiny
    from tether.models.tiny import TinyConfig, save_hf
    from tether.tasks.registry import get_task

    config = TinyConfig(d_model=args.d_model, n_layers=args.layers, n_heads=4, d_ff=2 * args.d_model + 64)
    model, tokenizer = warm_started_tiny(get_task("arithmetic", **BASE_TASK), seed=seed, steps=args.base_steps,
                                         config=config)  # cached under $TETHER_CACHE/warmstart
    return save_hf(model, tokenizer, out)


def to_bf16(folder: Path, out: Path) -> Path:
    """A copy of ``folder`` with its weights rounded to bfloat16 (the merge then sees bf16 task vectors)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, out)
    state = load_file(str(folder / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    return out


def rl(base: Path, task: str, seed: int, args: argparse.Namespace, run: Path, out: Path) -> Path:
    from tether.train.export import export_run
    from tether.train.sync import train

    train(TrainConfig.from_flat(model=str(base), task="arithmetic", task_options=TASKS[task], steps=args.rl_steps,
                                seed=seed, lr=args.lr, prompts_per_step=args.prompts, max_new_tokens=6, eval_size=8,
                                out=str(run), progress=False, threads=args.threads, checkpoint_every=args.rl_steps))
    return export_run(run, out)


def accuracy(folder: Path, task: str, args: argparse.Namespace) -> float:
    from tether import Trainer

    return Trainer(args={"model": str(folder), "task": "arithmetic", "task_options": TASKS[task], "max_new_tokens": 6,
                         "eval_size": args.eval_size, "threads": args.threads, "progress": False}).evaluate()


def one_seed(seed: int, args: argparse.Namespace, root: Path) -> list[dict]:
    """One row per precision: the same base and RL sources, merged and evaluated as fp32 and as bf16."""
    t0 = time.perf_counter()
    base = build_base(seed, args, root / "base")
    sources = {t: rl(base, t, seed, args, root / f"run_{t}", root / f"model_{t}") for t in TASKS}
    rows = []
    for precision in args.precision:
        b, src = base, sources
        if precision == "bf16":
            b = to_bf16(base, root / "base_bf16")
            src = {t: to_bf16(p, root / f"model_{t}_bf16") for t, p in sources.items()}
        models = {"base": b, **{f"RL on {t}": p for t, p in src.items()}}
        stats = {}
        for method in METHODS:
            out = root / f"merged_{method}_{precision}"
            summary = merge_folders(MergeConfig(base=str(b), models=[str(p) for p in src.values()], out=str(out),
                                                method=method, progress=False))
            stats[method] = summary["models"]
            models[method] = out
        acc = {name: {t: accuracy(p, t, args) for t in TASKS} for name, p in models.items()}
        row = {"seed": seed, "precision": precision, "accuracy": acc,
               "shared_fraction": [m["shared_fraction"] for m in stats["ram"]],
               "changed_fraction": [m["changed_fraction"] for m in stats["ram"]],
               "lambda": [m["rescale_lambda"] for m in stats["ram-plus"]], "time_s": time.perf_counter() - t0}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def fmt(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * sd:.1f}"


def table(rows: list[dict]) -> str:
    """Accuracy per model and task, and the mean of both tasks minus plain averaging's on the same seed (paired:
    the seeds' bases differ by far more than the methods do)."""
    names = list(rows[0]["accuracy"])

    def both(r, name):
        return (r["accuracy"][name]["add"] + r["accuracy"][name]["sub"]) / 2

    lines = ["| model | add (held-out %) | sub (held-out %) | mean of both | mean of both - average's, paired |",
             "|---|---|---|---|---|"]
    for name in names:
        add = [r["accuracy"][name]["add"] for r in rows]
        sub = [r["accuracy"][name]["sub"] for r in rows]
        paired = fmt([both(r, name) - both(r, "average") for r in rows])
        lines.append(f"| {name} | {fmt(add)} | {fmt(sub)} | {fmt([both(r, name) for r in rows])} | {paired} |")
    shared = [f for r in rows for f in r["shared_fraction"]]
    changed = [f for r in rows for f in r["changed_fraction"]]
    lam = [x for r in rows for x in r["lambda"]]
    lines.append("")
    lines.append(f"changed coordinates per source: {min(changed):.1%}-{max(changed):.1%} of all; shared with the "
                 f"other source: {min(shared):.1%}-{max(shared):.1%} of its changes; RAM+ lambda "
                 f"{min(lam):.4f}-{max(lam):.4f}")
    return "\n".join(lines)


def tables(rows: list[dict]) -> str:
    out = []
    for precision in dict.fromkeys(r["precision"] for r in rows):
        sel = [r for r in rows if r["precision"] == precision]
        out.append(f"{precision} checkpoints, seeds {[r['seed'] for r in sel]}:\n\n{table(sel)}\n")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--base-steps", type=int, default=1000, help="SFT warm-start steps of the base")
    p.add_argument("--d-model", type=int, default=96, help="base model hidden size (d_ff = 2 d_model + 64)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rl-steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=2e-5, help="RL learning rate (tether train's default)")
    p.add_argument("--prompts", type=int, default=16, help="RL prompts per step (8 completions each)")
    p.add_argument("--eval-size", type=int, default=100)
    p.add_argument("--precision", choices=["fp32", "bf16"], nargs="+", default=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--table", nargs="+", default=None, help="print the tables of these --json files and exit")
    args = p.parse_args()
    if args.table:
        print(tables([r for f in args.table for r in json.loads(Path(f).read_text())["rows"]]))
        return
    torch.set_num_threads(args.threads)
    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix=f"tether-merge-bench-{seed}-") as tmp:
            rows.extend(one_seed(seed, args, Path(tmp)))
    print(tables(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
