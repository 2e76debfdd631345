"""The sampling transform, shared by the engine (to sample) and the trainer (to replay).

Given logits ``z`` and temperature ``tau``, let ``s = z / tau`` and order the vocabulary by ``s``
descending, ties broken by the lower token id first (a stable sort: deterministic). The kept set
is the first ``c`` tokens of that order with

    c = min(c_k, c_p),  c_k = min(top_k, V)  (V without top-k),
    c_p = #{i : sum_{j<i} p_j < top_p}  over the top-k-renormalised probabilities p (V without top-p),

i.e. top-k first, then the smallest prefix whose mass reaches ``top_p`` (as in HF's logits warpers
and vLLM). The sampled distribution is ``mu(v) = exp(s_v) / sum_{u in kept} exp(s_u)`` for ``v`` in
the kept set and 0 outside (log-prob ``-inf``).

``replay_logprobs`` rebuilds ``mu`` from a recorded kept count ``c`` alone, so the trainer applies
exactly the truncation the engine applied even when its own logits differ slightly.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _sorted_desc(scaled_xV: Tensor) -> tuple[Tensor, Tensor]:
    return torch.sort(scaled_xV, dim=-1, descending=True, stable=True)


def _mask_beyond(sorted_xV: Tensor, kept_x: Tensor) -> Tensor:
    rank = torch.arange(sorted_xV.shape[-1], device=sorted_xV.device)
    return sorted_xV.masked_fill(rank >= kept_x[..., None], float("-inf"))


def _unsort(sorted_vals_xV: Tensor, order_xV: Tensor) -> Tensor:
    return torch.empty_like(sorted_vals_xV).scatter_(-1, order_xV, sorted_vals_xV)


def sampling_logprobs(logits_BxV: Tensor, temperature: float, top_k: int | None = None,
                      top_p: float | None = None) -> tuple[Tensor, Tensor]:
    """Log-probabilities of the truncated, tempered distribution and the size of its support.

    Args: ``logits_BxV`` (any leading shape), ``temperature`` > 0, ``top_k`` >= 1 or None,
    ``top_p`` in (0, 1] or None. Returns ``(logprobs_BxV, kept_count_Bx)``: ``-inf`` outside the
    kept set; ``kept_count`` is ``V`` when nothing is truncated. Computed in the logits' dtype.
    """
    if not temperature > 0:
        raise ValueError(f"sampling_logprobs: temperature must be > 0, got {temperature}")
    V = logits_BxV.shape[-1]
    scaled = logits_BxV / temperature if temperature != 1.0 else logits_BxV  # x / 1 == x exactly
    no_k = top_k is None or top_k >= V
    no_p = top_p is None or top_p >= 1.0
    if no_k and no_p:
        kept = torch.full(scaled.shape[:-1], V, dtype=torch.long, device=scaled.device)
        return torch.log_softmax(scaled, dim=-1), kept
    sorted_s, order = _sorted_desc(scaled)
    kept = torch.full(scaled.shape[:-1], V if no_k else int(top_k), dtype=torch.long, device=scaled.device)
    if not no_k:
        sorted_s = _mask_beyond(sorted_s, kept)
    if not no_p:
        probs = torch.softmax(sorted_s, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        kept_p = (mass_before < top_p).sum(-1).clamp(min=1)
        kept = torch.minimum(kept, kept_p)
        sorted_s = _mask_beyond(sorted_s, kept)
    return _unsort(torch.log_softmax(sorted_s, dim=-1), order), kept


def replay_logprobs(logits_BxV: Tensor, temperature: float, kept_count_Bx: Tensor | None) -> Tensor:
    """Rebuild the sampled distribution from a recorded support size.

    Keeps the ``kept_count`` largest ``logits / temperature`` (stable order, lower id first on ties)
    and renormalises; ``kept_count=None`` means no truncation. Entries with ``kept_count >= V`` are
    untruncated.
    """
    if not temperature > 0:
        raise ValueError(f"replay_logprobs: temperature must be > 0, got {temperature}")
    scaled = logits_BxV / temperature if temperature != 1.0 else logits_BxV
    if kept_count_Bx is None:
        return torch.log_softmax(scaled, dim=-1)
    kept = kept_count_Bx.to(device=scaled.device, dtype=torch.long)
    if kept.shape != scaled.shape[:-1]:
        raise ValueError(f"replay_logprobs: kept_count shape {tuple(kept.shape)} does not match logits "
                         f"{tuple(scaled.shape)} without the vocab axis")
    if bool((kept < 1).any()):
        raise ValueError("replay_logprobs: kept_count must be >= 1 everywhere")
    sorted_s, order = _sorted_desc(scaled)
    return _unsort(torch.log_softmax(_mask_beyond(sorted_s, kept), dim=-1), order)


def entropy_from_logprobs(logprobs_BxV: Tensor) -> Tensor:
    """``H = -sum_v p_v log p_v`` with ``0 log 0 = 0`` (entries at ``-inf`` contribute nothing)."""
    p = logprobs_BxV.exp()
    return -(p * torch.where(p > 0, logprobs_BxV, torch.zeros_like(logprobs_BxV))).sum(-1)


def sample_from_logprobs(logprobs_BV: Tensor, generator: torch.Generator | None, *,
                         noise_BV: Tensor | None = None, out_B: Tensor | None = None) -> Tensor:
    """One token per row from ``exp(logprobs)``: ``argmax_v p_v / E_v`` with ``E_v ~ Exp(1)``
    (the exponential-race form of Gumbel-max; exact sampling, one RNG draw per vocab entry).

    ``noise_BV`` (float32, the shape of ``logprobs_BV``) and ``out_B`` (long) are optional
    preallocated buffers for a decode loop; the draws and the result are the same with or without them.
    """
    p = logprobs_BV.exp()
    e = torch.empty_like(p) if noise_BV is None else noise_BV
    e.exponential_(generator=generator)
    return torch.argmax(p.div_(e), dim=-1, out=out_B) if out_B is not None else torch.argmax(p.div_(e), dim=-1)
