"""Class-wise rewards, their PI-controlled constraint terms and the multiplicative PI controller
(FAKER-Air, methods.md (a)11, generalised from AQI pixels to one graded numeric answer per row).

A numeric value ``v`` falls in class ``c(v) = k`` for ``b_k <= v < b_{k+1}`` over ascending bounds
``b_0 < b_1 < ... < b_K``; below ``b_0`` is class 0, at or above ``b_K`` is class ``K - 1``. An answer that
could not be read (NaN) has class ``-1``. A class is *high* (an "alarm") when ``c >= h`` (``high_from``;
FAKER-Air's AQI "bad" is class 2). With ``p`` the predicted and ``g`` the gold class of a row:

    r = coarse_w 1[high(p) = high(g)] + exact_w 1[p = g] - fa_penalty 1[high(p) and not high(g)]

An unreadable prediction (``p = -1``) is never high and never exact: it gets ``coarse_w 1[not high(g)]``.

Batch detection rates (``recall_far``): ``Recall = #(high(p) and high(g)) / #high(g)`` and the false-alarm
ratio ``FAR = #(high(p) and not high(g)) / #high(p)`` (each 0 when its denominator is 0).

Constraint shaping (``constraint_terms``). FAKER-Air adds ``lam_rec (Recall_i - floor) - lam_far max(0,
FAR_i - target)`` to sample i's reward, where ``Recall_i`` and ``FAR_i`` are that sample's rates over its
pixels. INFERRED for one answer per row: a row's own rates are indicators, defined only where their
denominator is: ``Recall_i = 1[high(p)]`` on rows with ``high(g)``, ``FAR_i = 1[not high(g)]`` on rows with
``high(p)``; a row where a rate is undefined gets 0 for that term:

    s_i = lam_rec 1[high(g_i)] (1[high(p_i)] - floor) - lam_far 1[high(p_i)] max(0, 1[not high(g_i)] - target)

The multipliers follow the batch rates through ``pi_update``.

PI controller (FAKER-Air's PIKLController and PIConstraint, one rule): with error ``e`` (measured - target
for a quantity that must stay below its target, target - measured for one that must stay above it),

    I' = decay I + e,        x' = clip(x exp(kp e + ki I'), lo, hi).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

UNREAD = -1


def bin_classes(values_B: Tensor, bounds: tuple[float, ...] | list[float]) -> Tensor:
    """Class index of each value (module docstring): ``k`` for ``b_k <= v < b_{k+1}``, clamped to
    ``[0, K - 1]``; NaN -> -1. ``bounds``: at least two strictly ascending finite numbers."""
    b = [float(x) for x in bounds]
    if len(b) < 2 or any(not math.isfinite(x) for x in b) or any(y <= x for x, y in zip(b, b[1:])):
        raise ValueError(f"class bounds must be at least two strictly ascending finite numbers, got {list(bounds)}")
    v = values_B.to(torch.float64)
    edges = torch.tensor(b[1:-1], dtype=torch.float64)
    cls = torch.bucketize(v, edges, right=True)  # number of inner edges <= v
    return torch.where(torch.isnan(v), torch.full_like(cls, UNREAD), cls)


def _high(cls_B: Tensor, high_from: int) -> Tensor:
    return cls_B >= high_from  # -1 (unread) is never high for high_from >= 0


def classwise_reward(pred_cls_B: Tensor, gold_cls_B: Tensor, *, high_from: int, coarse_w: float, exact_w: float,
                     fa_penalty: float) -> Tensor:
    """``r = coarse_w 1[high(p) = high(g)] + exact_w 1[p = g] - fa_penalty 1[high(p), not high(g)]`` (float64)."""
    if pred_cls_B.shape != gold_cls_B.shape:
        raise ValueError(f"classwise_reward: pred {tuple(pred_cls_B.shape)} and gold {tuple(gold_cls_B.shape)} differ")
    hp, hg = _high(pred_cls_B, high_from), _high(gold_cls_B, high_from)
    exact = (pred_cls_B == gold_cls_B) & (pred_cls_B != UNREAD)
    f = torch.float64
    return coarse_w * (hp == hg).to(f) + exact_w * exact.to(f) - fa_penalty * (hp & ~hg).to(f)


def recall_far(pred_cls_B: Tensor, gold_cls_B: Tensor, *, high_from: int) -> tuple[float, float]:
    """Batch ``(Recall, FAR)`` (module docstring); a rate with an empty denominator is 0."""
    hp, hg = _high(pred_cls_B, high_from), _high(gold_cls_B, high_from)
    n_g, n_p = int(hg.sum()), int(hp.sum())
    recall = int((hp & hg).sum()) / n_g if n_g else 0.0
    far = int((hp & ~hg).sum()) / n_p if n_p else 0.0
    return recall, far


def constraint_terms(pred_cls_B: Tensor, gold_cls_B: Tensor, *, high_from: int, lam_rec: float, lam_far: float,
                     recall_floor: float, far_target: float) -> Tensor:
    """Per-row ``s_i`` of the module docstring (INFERRED one-answer reading), float64."""
    hp, hg = _high(pred_cls_B, high_from), _high(gold_cls_B, high_from)
    f = torch.float64
    rec = hg.to(f) * (hp.to(f) - recall_floor)
    far = hp.to(f) * ((~hg).to(f) - far_target).clamp(min=0.0)
    return lam_rec * rec - lam_far * far


def pi_update(value: float, integral: float, error: float, *, kp: float, ki: float, decay: float, lo: float,
              hi: float) -> tuple[float, float]:
    """One multiplicative PI step: ``I' = decay I + e``, ``x' = clip(x exp(kp e + ki I'), lo, hi)``;
    returns ``(x', I')``."""
    integral = decay * integral + error
    return min(max(value * math.exp(kp * error + ki * integral), lo), hi), integral


def ema(previous: float | None, value: float, alpha: float) -> float:
    """``m' = (1 - alpha) m + alpha v``; the first value (``previous`` None) starts the average."""
    return value if previous is None else (1.0 - alpha) * previous + alpha * value
