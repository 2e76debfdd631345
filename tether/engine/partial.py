"""Partial rollouts: generation in chunks, with a weight update allowed between chunks.

``generate_partial`` runs ``engine.generate`` on the unfinished rows ``chunk_tokens`` tokens at a
time, each chunk continuing from prompt + completion so far (a fresh prefill with whatever weights
the engine holds then: AReaL's interruptible generation, which also drops the KV cache on a weight
update). Every token keeps the version of the chunk that sampled it, so one completion can span
several versions. Stop strings are matched inside a chunk only (EOS works across chunks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import Tensor

from tether.engine.base import Engine
from tether.rollout import Rollout, SamplingParams


def generate_partial(engine: Engine, prompts: Sequence[Sequence[int]], params: SamplingParams, *, seed_fn: Callable[[int], int],
                     group_B: Tensor, chunk_tokens: int | None,
                     before_chunk: Callable[[int], None] | None = None) -> Rollout:
    """Sample one completion per prompt in chunks; ``before_chunk(c)`` runs before chunk ``c``
    (it may call ``engine.load_weights``); chunk ``c`` uses seed ``seed_fn(c)``. ``chunk_tokens``
    None (or >= max_new_tokens) is one ordinary ``engine.generate`` call."""
    N = params.max_new_tokens
    if chunk_tokens is None or chunk_tokens >= N:
        if before_chunk is not None:
            before_chunk(0)
        return engine.generate(prompts, params, seed=seed_fn(0), group_B=group_B)
    B = len(prompts)
    V = engine.vocab_size
    comp: list[list[int]] = [[] for _ in range(B)]
    logp: list[list[float]] = [[] for _ in range(B)]
    kept: list[list[int]] = [[] for _ in range(B)]
    ver: list[list[int]] = [[] for _ in range(B)]
    finished = [False] * B
    c = 0
    while True:
        active = [i for i in range(B) if not finished[i] and len(comp[i]) < N]
        if not active:
            break
        if before_chunk is not None:
            before_chunk(c)
        n_new = min(chunk_tokens, N - len(comp[active[0]]))  # unfinished rows all have the same length
        sub = engine.generate([list(prompts[i]) + comp[i] for i in active], replace(params, max_new_tokens=n_new),
                              seed=seed_fn(c), group_B=group_B[active])
        for j, i in enumerate(active):
            a = int(sub.prompt_len_B[j])
            b = a + int(sub.completion_len_B[j])
            comp[i] += sub.tokens_BT[j, a:b].tolist()
            logp[i] += sub.logp_mu_BT[j, a:b].tolist()
            kept[i] += sub.kept_count_BT[j, a:b].tolist() if sub.kept_count_BT is not None else [V] * (b - a)
            ver[i] += sub.version_BT[j, a:b].tolist()
            finished[i] = bool(sub.finished_B[j])
        c += 1
    return assemble(prompts, comp, logp, kept, ver, finished, params, group_B, pad_id=engine.pad_id, vocab_size=V)


def assemble(prompts, comp, logp, kept, ver, finished, params: SamplingParams, group_B: Tensor, *, pad_id: int,
             vocab_size: int) -> Rollout:
    """A right-padded :class:`Rollout` from per-row Python lists (versions -1 outside completions)."""
    B = len(prompts)
    lens = [len(p) for p in prompts]
    T = max(lens[i] + len(comp[i]) for i in range(B))
    tokens_BT = torch.full((B, T), pad_id, dtype=torch.long)
    logp_BT = torch.zeros(B, T, dtype=torch.float32)
    kept_BT = torch.full((B, T), vocab_size, dtype=torch.long)
    ver_BT = torch.full((B, T), -1, dtype=torch.long)
    for i in range(B):
        a, n = lens[i], len(comp[i])
        tokens_BT[i, :a] = torch.tensor(list(prompts[i]), dtype=torch.long)
        if n:
            tokens_BT[i, a:a + n] = torch.tensor(comp[i], dtype=torch.long)
            logp_BT[i, a:a + n] = torch.tensor(logp[i], dtype=torch.float32)
            kept_BT[i, a:a + n] = torch.tensor(kept[i], dtype=torch.long)
            ver_BT[i, a:a + n] = torch.tensor(ver[i], dtype=torch.long)
    return Rollout(tokens_BT=tokens_BT, prompt_len_B=torch.tensor(lens, dtype=torch.long),
                   completion_len_B=torch.tensor([len(x) for x in comp], dtype=torch.long), logp_mu_BT=logp_BT,
                   version_BT=ver_BT, kept_count_BT=kept_BT if params.truncates else None, sampling=params,
                   group_B=group_B.clone(), finished_B=torch.tensor(finished, dtype=torch.bool))
