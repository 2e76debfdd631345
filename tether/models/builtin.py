"""The built-in policy: character tokenizer + tiny llama-style model, warm-started on a task."""

from __future__ import annotations

from pathlib import Path

import torch

from tether.models.tiny import TinyConfig, TinyLM
from tether.models.tokenizer import CharTokenizer
from tether.models.warmstart import WarmStartInfo, warm_start


def tiny_model(seed: int, config: TinyConfig | None = None) -> tuple[TinyLM, CharTokenizer]:
    """A freshly initialised tiny model (initialisation from ``seed``, global RNG untouched)."""
    tokenizer = CharTokenizer()
    cfg = config or TinyConfig(vocab_size=tokenizer.vocab_size)
    if cfg.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"TinyConfig.vocab_size {cfg.vocab_size} < tokenizer vocab size {tokenizer.vocab_size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyLM(cfg)
    return model.eval(), tokenizer


def warm_started_tiny(task, *, seed: int, steps: int, config: TinyConfig | None = None,
                      cache_dir: str | Path | None = None) -> tuple[TinyLM, CharTokenizer]:
    """Tiny model + tokenizer, SFT-warm-started on ``task`` for ``steps`` steps (cached on disk)."""
    model, tokenizer = tiny_model(seed, config)
    info: WarmStartInfo = warm_start(model, tokenizer, task, steps=steps, seed=seed, cache_dir=cache_dir)
    model.warmstart_info = info
    return model, tokenizer
