"""A real ``TetherGRPOTrainer`` on the built-in tiny model, built offline for the TRL adapter tests."""

from __future__ import annotations

from pathlib import Path

import pytest


def tiny_hf_model(folder: Path) -> Path:
    """The built-in tiny model (seed 0) as a Hugging Face folder with an AutoTokenizer-loadable tokenizer."""
    from tether.models.builtin import tiny_model
    from tether.models.tiny import save_hf

    model, tok = tiny_model(0)
    return save_hf(model, tok, folder)


def reward_digits(completions, **kwargs):
    """Digits in each completion: varied rewards (non-zero advantages) on the tiny model's completions."""
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]


def make_trainer(folder: Path, *, stock: bool = False, reward=None, callbacks=None, prompts=("1+1=",) * 4,
                 objective: str = "grpo", **config):
    """A ``TetherGRPOTrainer`` (``objective``), or TRL's own ``GRPOTrainer`` with ``stock``, over a
    4-prompt dataset, on CPU, logging every step; ``reward`` defaults to 0 for every completion."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from tether.adapters.trl import TetherGRPOTrainer

    model_dir = folder / "model"
    if not model_dir.exists():
        tiny_hf_model(model_dir)
    settings = dict(output_dir=str(folder / "out"), use_cpu=True, bf16=False, per_device_train_batch_size=4,
                    num_generations=4, max_completion_length=6, max_steps=1, logging_steps=1, save_strategy="no",
                    report_to="none", seed=0, disable_tqdm=True)
    settings.update(config)
    kwargs = dict(model=str(model_dir), reward_funcs=reward or (lambda completions, **_: [0.0] * len(completions)),
                  args=GRPOConfig(**settings), train_dataset=Dataset.from_dict({"prompt": list(prompts)}),
                  callbacks=callbacks)
    return GRPOTrainer(**kwargs) if stock else TetherGRPOTrainer(**kwargs, objective=objective)
