"""Reward shaping and batch filtering used by the RL loop (pure functions of tensors)."""

from __future__ import annotations

import torch
from torch import Tensor


def soft_overlong_penalty(lengths_B: Tensor, max_len: int, buffer: int, coef: float = 1.0) -> Tensor:
    """DAPO soft overlong penalty (Yu et al. 2025; methods.md B4), added to the reward.

    ``R_len = 0`` if ``|y| <= L_max - L_buf``; else ``-c (|y| - (L_max - L_buf)) / L_buf``, capped at ``-c``.
    """
    start = max_len - buffer
    over = (lengths_B.to(torch.float64) - start).clamp(min=0.0)
    return -(coef * over / buffer).clamp(max=coef)


def informative_groups(rewards_B: Tensor, group_B: Tensor) -> Tensor:
    """DAPO dynamic sampling: True for rows whose group's rewards are not all equal."""
    keep = torch.zeros_like(group_B, dtype=torch.bool)
    for g in torch.unique(group_B):
        rows = group_B == g
        r = rewards_B[rows]
        keep[rows] = bool((r != r[0]).any())
    return keep
