"""``tether export RUN_DIR --out DIR``: the run's latest checkpoint as a Hugging Face folder."""

from __future__ import annotations

import argparse

NAME = "export"
HELP = "Write a run's latest checkpoint as a safetensors Hugging Face folder (LoRA merged)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a tether run directory (config.json + checkpoints/)")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")


def run(args: argparse.Namespace) -> int:
    from tether.train.checkpoint import CheckpointError
    from tether.train.export import export_run

    try:
        out = export_run(args.run_dir, args.out)
    except (FileExistsError, CheckpointError) as e:
        raise ValueError(str(e)) from None
    print(f"wrote {out} (load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return 0
