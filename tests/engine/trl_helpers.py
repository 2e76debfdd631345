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


def make_trainer(folder: Path, **config):
    """A ``TetherGRPOTrainer`` (objective ``grpo``) over a 4-prompt dataset, on CPU, logging every step."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import GRPOConfig

    from tether.adapters.trl import TetherGRPOTrainer

    model_dir = tiny_hf_model(folder / "model")
    settings = dict(output_dir=str(folder / "out"), use_cpu=True, bf16=False, per_device_train_batch_size=4,
                    num_generations=4, max_completion_length=6, max_steps=1, logging_steps=1, save_strategy="no",
                    report_to="none", seed=0, disable_tqdm=True)
    settings.update(config)
    return TetherGRPOTrainer(model=str(model_dir), reward_funcs=lambda completions, **_: [0.0] * len(completions),
                             args=GRPOConfig(**settings), train_dataset=Dataset.from_dict({"prompt": ["1+1="] * 4}),
                             objective="grpo")
