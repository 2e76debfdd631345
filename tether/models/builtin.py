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
                      cache_dir: str | Path | None = None, max_turns: int = 8, progress=None,
                      label: str = "warm start") -> tuple[TinyLM, CharTokenizer]:
    """Tiny model + tokenizer, SFT-warm-started on ``task`` for ``steps`` steps (cached on disk); an
    environment's warm start plays at most ``max_turns`` expert turns per episode. ``progress``: a
    ``tether.train.progress.Reporter`` that shows the SFT steps."""
    model, tokenizer = tiny_model(seed, config)
    batch_fn = None
    if hasattr(task, "warmstart_batch"):  # an environment (tether.agent.task): SFT on its expert episodes
        from tether.agent.render import PlainRenderer

        renderer = PlainRenderer(tokenizer)

        def batch_fn(rng, batch_size):
            return task.warmstart_batch(rng, batch_size, tokenizer, renderer, max_turns=max_turns,
                                        max_tokens=model.config.max_len, pad_id=tokenizer.pad_id)
    info: WarmStartInfo = warm_start(model, tokenizer, task, steps=steps, seed=seed, cache_dir=cache_dir,
                                     batch_fn=batch_fn, progress=progress, label=label)
    model.warmstart_info = info
    return model, tokenizer
