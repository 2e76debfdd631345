"""Short supervised warm start so RL starts with signal, cached on disk.

Trains ``model`` in place with next-token cross-entropy on ``prompt + (solution or answer) + eos``
sequences drawn from ``task.sample(rng)``; the loss covers the completion tokens only (prompt
tokens are context). AdamW, linear warmup then cosine decay, gradient clipping at 1.

The result is cached under ``$TETHER_CACHE/warmstart`` (default ``~/.cache/tether/warmstart``),
keyed by a hash of the initial weights, the model config, the tokenizer vocabulary, the task (a
dataset's training rows, a generated task's name and config), the training hyper-parameters and
the seed; files are written atomically (temp file + rename), so a killed run never leaves a
half-written cache entry.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

CACHE_FORMAT = 1


@dataclass
class WarmStartInfo:
    cache_path: Path
    """Where the warm-started weights live."""
    from_cache: bool
    """True when the weights were loaded rather than trained."""
    losses: list[float] = field(default_factory=list)
    """Training loss per step (empty when loaded from the cache)."""
    seconds: float = 0.0


def cache_root(cache_dir: str | Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("TETHER_CACHE", Path.home() / ".cache" / "tether")) / "warmstart"


def _describe(obj) -> object:
    if obj is None:
        return None
    if is_dataclass(obj):
        return asdict(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    return repr(obj)


def cache_key(model: torch.nn.Module, tokenizer, task, *, steps: int, seed: int, hparams: dict) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    vocab = tokenizer.vocab() if hasattr(tokenizer, "vocab") else getattr(tokenizer, "vocab_size", None)
    if hasattr(task, "cache_identity"):  # a dataset: its training rows, not its path (tether.tasks.base)
        task_meta = {"task_rows": task.cache_identity()}
    else:  # a generated task: its name and config say which problems it draws
        task_meta = {"task": getattr(task, "name", type(task).__name__),
                     "task_config": _describe(getattr(task, "config", None))}
    meta = {"format": CACHE_FORMAT, "model": _describe(getattr(model, "config", None)), "vocab": vocab,
            "eos": tokenizer.eos_id, **task_meta, "steps": steps, "seed": seed, "hparams": hparams}
    h.update(json.dumps(meta, sort_keys=True, default=repr).encode())
    return h.hexdigest()[:24]


def _batch(examples, tokenizer, pad_id: int):
    seqs, starts = [], []
    for ex in examples:
        prompt = tokenizer.encode(ex.prompt)
        target = ex.solution if ex.solution is not None else ex.answer
        seqs.append(prompt + tokenizer.encode(target) + [tokenizer.eos_id])
        starts.append(len(prompt))
    T = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T - 1, dtype=torch.bool)
    for i, (s, p) in enumerate(zip(seqs, starts)):
        tokens[i, :len(s)] = torch.tensor(s)
        mask[i, p - 1:len(s) - 1] = True  # logits at t predict token t+1: completion targets only
    return tokens, mask


def sft_loss(model: torch.nn.Module, tokens_BT: torch.Tensor, target_mask_BT: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the masked targets (``target_mask`` aligned with ``tokens[:, 1:]``)."""
    from tether.models.logprobs import sequence_logits

    valid = torch.ones_like(tokens_BT, dtype=torch.bool)
    logits = sequence_logits(model, tokens_BT, valid)[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens_BT[:, 1:].reshape(-1), reduction="none")
    mask = target_mask_BT.reshape(-1).to(nll.dtype)
    return (nll * mask).sum() / mask.sum().clamp(min=1)


def warm_start(model: torch.nn.Module, tokenizer, task, *, steps: int, seed: int,
               cache_dir: str | Path | None = None, batch_size: int = 64, lr: float = 2e-3,
               warmup: int = 20, batch_fn=None, progress=None, label: str = "warm start") -> WarmStartInfo:
    """SFT ``model`` in place for ``steps`` steps on ``task.sample`` examples, or load the cached result.
    ``batch_fn(rng, batch_size) -> (tokens_BT, target_mask)`` replaces the examples where a task's data are
    not prompt/solution pairs (an environment's expert episodes, ``tether.agent.task``). ``progress`` (a
    ``tether.train.progress.Reporter``) shows the SFT steps, or a line saying the cache was used."""
    if steps < 0:
        raise ValueError(f"warm_start: steps must be >= 0, got {steps}")
    if batch_size < 1:
        raise ValueError(f"warm_start: batch_size must be >= 1, got {batch_size}")
    hparams = {"batch_size": batch_size, "lr": lr, "warmup": warmup}
    root = cache_root(cache_dir)
    path = root / f"{cache_key(model, tokenizer, task, steps=steps, seed=seed, hparams=hparams)}.pt"
    t0 = time.perf_counter()
    if path.exists():
        payload = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(payload["state_dict"])
        if progress is not None:
            progress.note(f"{label}: {steps} SFT steps loaded from the cache ({path})")
        return WarmStartInfo(cache_path=path, from_cache=True, seconds=time.perf_counter() - t0)

    rng = random.Random(seed)
    pad_id = getattr(tokenizer, "pad_id", tokenizer.eos_id)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(steps - warmup, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model.train()
    losses = []
    with (progress.phase(label, steps) if progress is not None and steps > 0 else nullcontext()) as bar:
        for _ in range(steps):
            tokens, mask = (batch_fn(rng, batch_size) if batch_fn is not None
                            else _batch([task.sample(rng) for _ in range(batch_size)], tokenizer, pad_id))
            loss = sft_loss(model, tokens, mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if bar is not None:
                bar.advance({"sft/loss": losses[-1]})
    model.eval()

    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".tmp-", suffix=".pt")
    os.close(fd)
    try:
        torch.save({"state_dict": model.state_dict(), "losses": losses}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return WarmStartInfo(cache_path=path, from_cache=False, losses=losses, seconds=time.perf_counter() - t0)
