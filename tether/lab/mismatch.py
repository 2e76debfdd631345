"""Behaviour policies ``mu`` derived from ``pi`` by a mismatch model with a strength ``s >= 0``.

Each model returns the per-prefix probability table ``mu_PV`` (``s = 0`` gives ``mu = pi``):

- ``staleness``: ``mu = pi`` at ``theta - s * sqrt(P V) * u``, ``u`` a random unit direction (so each
  logit moves by about ``s``): the engine runs older weights.
- ``precision``: logits rounded to a float grid with ``b = round(7 - 4 s)`` mantissa bits (``s = 0``:
  exact, ``s = 1``: 3 bits like fp8-e4m3, ``0 < s < 1`` interpolates from bf16's 7 bits, ``s > 1``
  coarser, down to 0 bits).
- ``noise``: i.i.d. Gaussian noise of std ``s`` added to every logit (a kernel nondeterminism model).
- ``temperature``: ``mu`` logits ``= logits / (1 + s)``.
- ``truncation``: top-p sampling with ``p = 1 - s / 2``, renormalised; tokens outside the nucleus have
  ``mu = 0``. Importance sampling cannot recover the mass ``mu`` never samples, so every estimator is
  biased here (a fact the lab reports, not a bug).
- ``teacher``: per prefix ``mu = (1 - s) pi + s q`` with ``q`` a different random policy (``s <= 1``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MISMATCHES = ("staleness", "precision", "noise", "temperature", "truncation", "teacher")


def round_mantissa(x: Tensor, bits: int) -> Tensor:
    """Round to the nearest float with ``bits`` explicit mantissa bits (unbounded exponent)."""
    m, e = torch.frexp(x)  # x = m 2^e, |m| in [0.5, 1)
    step = 2.0 ** (bits + 1)
    return torch.ldexp(torch.round(m * step) / step, e)


def top_p(probs_PV: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely tokens with mass ``>= p`` (at least one), renormalise."""
    sorted_p, order = torch.sort(probs_PV, dim=-1, descending=True)
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p
    keep_sorted = before < p
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    kept = torch.where(keep, probs_PV, torch.zeros_like(probs_PV))
    return kept / kept.sum(-1, keepdim=True)


def behaviour_probs(logits_PV: Tensor, kind: str, strength: float, *, seed: int = 0) -> Tensor:
    """``mu_PV`` for mismatch ``kind`` at ``strength`` (see the module doc)."""
    if kind not in MISMATCHES:
        raise ValueError(f"lab: unknown mismatch '{kind}'; valid: {', '.join(MISMATCHES)}")
    s = float(strength)
    if s < 0 or not math.isfinite(s):
        raise ValueError(f"lab: mismatch strength must be a finite number >= 0, got {strength}")
    logits = logits_PV.detach()
    g = torch.Generator().manual_seed(seed + 12345)
    if kind == "staleness":
        u = torch.randn(logits.shape, generator=g, dtype=logits.dtype)
        u = u / u.norm()
        return torch.softmax(logits - s * math.sqrt(logits.numel()) * u, -1)
    if kind == "precision":
        if s == 0:
            return torch.softmax(logits, -1)
        return torch.softmax(round_mantissa(logits, max(0, round(7 - 4 * s))), -1)
    if kind == "noise":
        return torch.softmax(logits + s * torch.randn(logits.shape, generator=g, dtype=logits.dtype), -1)
    if kind == "temperature":
        return torch.softmax(logits / (1.0 + s), -1)
    if kind == "truncation":
        return top_p(torch.softmax(logits, -1), 1.0 - s / 2)
    if s > 1:
        raise ValueError(f"lab: teacher mismatch strength is a mixture weight in [0, 1], got {strength}")
    q = torch.softmax(torch.randn(logits.shape, generator=g, dtype=logits.dtype), -1)
    return (1 - s) * torch.softmax(logits, -1) + s * q
