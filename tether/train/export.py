"""``tether export``: a run's latest checkpoint as a standalone Hugging Face folder.

The run's ``config.json`` says how the policy was built; the policy is rebuilt without training
(the built-in model without its warm start, a Hugging Face model from its folder / GGUF / alias with
the same LoRA layout), the checkpoint's weights are loaded, LoRA adapters are merged into the base
weights, and the result is written as ``model.safetensors`` + ``config.json`` +
``generation_config.json`` + tokenizer files, loadable by ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tether.configs import build
from tether.train.checkpoint import load_latest_checkpoint
from tether.train.config import TrainConfig


def load_run_config(run_dir: str | Path) -> TrainConfig:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no config.json (not a tether run directory?)")
    return build(TrainConfig, json.loads(path.read_text()), str(path))


def export_run(run_dir: str | Path, out: str | Path) -> Path:
    """Write the run's latest checkpoint to ``out``; returns ``out``."""
    run_dir, out = Path(run_dir), Path(out)
    cfg = load_run_config(run_dir)
    ckpt = load_latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint to export (checkpoints/latest is missing)")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out}: folder exists and is not empty")
    step = int(ckpt["run_state"]["step"])
    if cfg.model == "tiny":
        from tether.models.builtin import tiny_model
        from tether.models.tiny import save_hf

        model, tokenizer = tiny_model(cfg.seed)
        model.load_state_dict(ckpt["model"])
        save_hf(model, tokenizer, out)
    else:
        from tether.models.hf import load_hf
        from tether.models.lora import add_lora, merge_lora

        model, tokenizer = load_hf(cfg.model, chat=cfg.chat_template)
        if cfg.lora_r is not None:
            model = add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, target_modules=cfg.lora_target_modules)
        model.load_state_dict(ckpt["model"])
        if cfg.lora_r is not None:
            model = merge_lora(model)
        model = model.to(torch.float32)
        model.save_pretrained(str(out), safe_serialization=True)
        tokenizer.tokenizer.save_pretrained(str(out))
    (out / "tether_export.json").write_text(json.dumps(
        {"run_dir": str(run_dir.resolve()), "step": step, "model": cfg.model, "lora_r": cfg.lora_r}, indent=2))
    return out
