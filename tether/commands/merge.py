"""``tether merge --base B --models A1 A2 ... --out DIR``: merge fine-tuned checkpoints (RAM, RAM+, averaging)."""

from __future__ import annotations

import argparse

NAME = "merge"
HELP = ("Merge models fine-tuned from one base into one folder: ram-plus (default), ram (Reinforced Agent "
        "Merging) or average (docs/merge.md).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="the base model folder every fine-tuned model started from")
    p.add_argument("--models", required=True, nargs="+", metavar="DIR",
                   help="fine-tuned model folders (tether export output, Hugging Face folders) or tether run "
                        "directories")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--method", default="ram-plus", choices=["ram-plus", "ram", "average"],
                   help="ram-plus: RAM+ (shared coordinates averaged, unique ones kept and rescaled per model); ram: "
                        "shared averaged, unique kept; average: plain task-vector averaging (default: ram-plus)")
    p.add_argument("--threshold", type=float, default=None,
                   help="|finetuned - base| above this counts as a change (default: 1e-05)")
    p.add_argument("--rescale", type=float, default=None,
                   help="RAM+ rescale factor r >= 1 of unique coordinates (default: 1.05; ram-plus only)")
    p.add_argument("--overlap-ratio", default=None, choices=["unique", "changed"],
                   help="RAM+ overlap ratio per model: shared/unique (unique, default) or shared/changed "
                        "(ram-plus only)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="print progress lines (default: on)")


def run(args: argparse.Namespace) -> int:
    from tether.configs import build
    from tether.merge.config import MergeConfig
    from tether.merge.run import merge_folders

    values = {k: getattr(args, k) for k in ("base", "models", "out", "method", "threshold", "rescale",
                                             "overlap_ratio", "progress")}
    cfg = build(MergeConfig, {k: v for k, v in values.items() if v is not None})
    try:
        s = merge_folders(cfg)
    except FileExistsError as e:
        raise ValueError(str(e)) from None
    print(summary_text(s))
    return 0


def summary_text(s: dict) -> str:
    """The summary table: per model the fraction of coordinates it changed and how its changes split."""
    settings = f"threshold {s['threshold']:g}"
    if s["rescale"] is not None:
        settings += f", r {s['rescale']:g}, overlap ratio {s['overlap_ratio']}"
    lines = [f"tether merge: {s['method']} ({settings}) of {len(s['models'])} model(s), {s['parameters']} "
             f"tensors, {s['coordinates']:,} coordinates"]
    width = max(len(m["path"]) for m in s["models"])
    lines.append(f"  {'model':<{width}}  changed  shared  unique  lambda")
    for m in s["models"]:
        lines.append(f"  {m['path']:<{width}}  {m['changed_fraction']:7.1%}  {m['shared_fraction']:6.1%}  "
                     f"{m['unique_fraction']:6.1%}  {m['rescale_lambda']:.4f}")
    lines.append("  (changed: of all coordinates; shared / unique: of that model's changes)")
    lines.append(f"wrote {s['out']} in {s['time_s']:.1f} s (tether train --model {s['out']}, or "
                 "transformers.AutoModelForCausalLM.from_pretrained)")
    return "\n".join(lines)
