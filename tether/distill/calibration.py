"""Calibration metrics and CaOPD's empirical-confidence target (building blocks of the ``caopd``
algorithm in :mod:`tether.distill.caopd`; results in docs/distill.md).

With stated confidences ``c_i`` in [0, 1] and correctness ``a_i`` in {0, 1} (CaOPD
``eval/calibration_metrics.py``, methods.md §(b)3):

- ECE with ``n_bins`` equal-width bins ``B_k`` (the last bin closed at 1):
  ``ECE = sum_k |B_k| / N * |mean_{B_k} a - mean_{B_k} c|``
- Brier score: ``mean (c - a)^2``
- overconfidence gap: ``OCG = mean c - mean a``

CaOPD's target: the confidence written into a completion is the student's *empirical* success rate
on that prompt, ``P_acc = #correct / K`` over its K rollouts, not its self-report.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor


def expected_calibration_error(conf_N: Tensor, correct_N: Tensor, *, n_bins: int = 10) -> Tensor:
    if n_bins < 1:
        raise ValueError(f"expected_calibration_error: n_bins must be >= 1, got {n_bins}")
    if conf_N.shape != correct_N.shape or conf_N.dim() != 1:
        raise ValueError("expected_calibration_error: conf_N and correct_N must be 1-D of equal length")
    c = conf_N.to(torch.float64).clamp(0.0, 1.0)
    a = correct_N.to(torch.float64)
    if c.numel() == 0:
        return torch.zeros((), dtype=torch.float64)
    bins = (c * n_bins).floor().clamp(max=n_bins - 1).long()
    gap = torch.zeros(n_bins, dtype=torch.float64).scatter_add_(0, bins, a - c)
    return gap.abs().sum() / c.numel()


def brier_score(conf_N: Tensor, correct_N: Tensor) -> Tensor:
    return ((conf_N.to(torch.float64) - correct_N.to(torch.float64)) ** 2).mean()


def overconfidence_gap(conf_N: Tensor, correct_N: Tensor) -> Tensor:
    return conf_N.to(torch.float64).mean() - correct_N.to(torch.float64).mean()


def empirical_confidence(correct_B: Tensor, group_B: Tensor) -> Tensor:
    """``P_acc`` of each row's group: the fraction of the group's rollouts that are correct."""
    groups, inverse = torch.unique(group_B, return_inverse=True)
    hits = torch.zeros(len(groups), dtype=torch.float64).scatter_add_(0, inverse, correct_B.to(torch.float64))
    size = torch.zeros(len(groups), dtype=torch.float64).scatter_add_(0, inverse, torch.ones_like(hits[inverse]))
    return (hits / size)[inverse]


def with_confidence(completion: str, p_acc: float, *, label: str = "Confidence: ") -> str:
    """Strip any trailing ``{label}...`` and append ``\\n{label}{p_acc:.2f}`` (CaOPD target)."""
    pattern = re.compile(r"\s*" + re.escape(label.strip()) + r"\s*[0-9.]*\s*$")
    return pattern.sub("", completion) + f"\n{label}{p_acc:.2f}"
