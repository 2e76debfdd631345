"""Advantage estimators: per-sequence rewards and group ids -> per-sequence advantages.

Every estimator is ``fn(rewards_B, group_B, include_B=None) -> advantages_B``. ``group_B`` holds
integer group (prompt) ids, in any order, groups of any size. ``include_B`` (bool) restricts which
rows enter the group statistics (expert rows in CalibRL / RL-PLUS, rejected samples: peers.md §3
item 14); every row still gets an advantage. Statistics are computed in float64.

- ``grpo``:      ``A_i = (R_i - mean_g R) / (std_g R + 1e-6)``, std unbiased (n-1); a group with one
                 included row gets mean 0 and std 1, so ``A_i = R_i`` (verl compute_grpo_outcome_advantage).
- ``dr_grpo``:   ``A_i = R_i - mean_g R`` (Liu et al. 2025); one-row groups: mean 0.
- ``rloo``:      ``A_i = R_i - mean_{j in g, j != i} R_j`` (Ahmadian et al. 2024); rows without another
                 included member of their group get 0. Excluded rows use the mean of all included rows.
- ``reinforce_pp``: REINFORCE++-baseline (Hu et al. 2025; OpenRLHF / verl): ``a_i = R_i - mean_g R``,
                 then ``A_i = (a_i - mean_batch a) / (std_batch a + 1e-6)`` over included rows.
- ``rank_ema``:  FAKER-Air's robust advantage (methods.md (a)11), stateful across steps:
                 ``A_i = (1 - c) rank_i + c (R_i - m') / (sqrt(v') + 1e-6)``, ``rank_i`` the centred rank in the
                 group (``centred_rank``), ``(m', v')`` the EMA of the batch mean reward and its squared
                 deviation (``rank_ema``). Not in ``ADVANTAGES`` (it needs its state): the trainer keeps that
                 state in the run state (tether/train/classwise.py) and binds it per step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

EPS = 1e-6
AdvantageFn = Callable[..., Tensor]


def _group_stats(rewards_B: Tensor, group_B: Tensor, include_B: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row group count, sum and sum of squares over included rows; returns (idx, n, s, s2) per group."""
    r = rewards_B.to(torch.float64)
    inc = torch.ones_like(r, dtype=torch.bool) if include_B is None else include_B.to(torch.bool)
    _, idx = torch.unique(group_B, return_inverse=True)
    G = int(idx.max()) + 1 if idx.numel() else 0
    w = inc.to(torch.float64)
    n = torch.zeros(G, dtype=torch.float64).index_add_(0, idx, w)
    s = torch.zeros(G, dtype=torch.float64).index_add_(0, idx, w * r)
    s2 = torch.zeros(G, dtype=torch.float64).index_add_(0, idx, w * r * r)
    return idx, n, s, s2


def _check(rewards_B: Tensor, group_B: Tensor, include_B: Tensor | None) -> None:
    if rewards_B.dim() != 1 or group_B.shape != rewards_B.shape:
        raise ValueError(f"advantages: rewards_B {tuple(rewards_B.shape)} and group_B {tuple(group_B.shape)} must be equal 1-D shapes")
    if include_B is not None and include_B.shape != rewards_B.shape:
        raise ValueError(f"advantages: include_B has shape {tuple(include_B.shape)}, expected {tuple(rewards_B.shape)}")


def _out(x: Tensor, like: Tensor) -> Tensor:
    return x.to(like.dtype if like.is_floating_point() else torch.float32)


def group_mean_std(rewards_B: Tensor, group_B: Tensor, include_B: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row (group mean, unbiased group std, group count) over included rows (float64)."""
    idx, n, s, s2 = _group_stats(rewards_B, group_B, include_B)
    mean = s / n.clamp(min=1)
    var = (s2 - n * mean * mean) / (n - 1).clamp(min=1)
    std = var.clamp(min=0).sqrt()
    return mean[idx], std[idx], n[idx]


def grpo(rewards_B: Tensor, group_B: Tensor, include_B: Tensor | None = None) -> Tensor:
    _check(rewards_B, group_B, include_B)
    mean, std, n = group_mean_std(rewards_B, group_B, include_B)
    single = n <= 1
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    return _out((rewards_B.to(torch.float64) - mean) / (std + EPS), rewards_B)


def dr_grpo(rewards_B: Tensor, group_B: Tensor, include_B: Tensor | None = None) -> Tensor:
    _check(rewards_B, group_B, include_B)
    mean, _, n = group_mean_std(rewards_B, group_B, include_B)
    mean = torch.where(n <= 1, torch.zeros_like(mean), mean)
    return _out(rewards_B.to(torch.float64) - mean, rewards_B)


def rloo(rewards_B: Tensor, group_B: Tensor, include_B: Tensor | None = None) -> Tensor:
    _check(rewards_B, group_B, include_B)
    r = rewards_B.to(torch.float64)
    inc = torch.ones_like(r, dtype=torch.bool) if include_B is None else include_B.to(torch.bool)
    idx, n, s, _ = _group_stats(rewards_B, group_B, include_B)
    own = inc.to(torch.float64)
    others = (n[idx] - own)
    baseline = (s[idx] - own * r) / others.clamp(min=1)
    return _out(torch.where(others > 0, r - baseline, torch.zeros_like(r)), rewards_B)


def reinforce_pp(rewards_B: Tensor, group_B: Tensor, include_B: Tensor | None = None) -> Tensor:
    _check(rewards_B, group_B, include_B)
    a = dr_grpo(rewards_B.to(torch.float64), group_B, include_B)
    inc = torch.ones_like(a, dtype=torch.bool) if include_B is None else include_B.to(torch.bool)
    sel = a[inc]
    if sel.numel() == 0:
        return _out(torch.zeros_like(a), rewards_B)
    mu = sel.mean()
    sd = sel.std() if sel.numel() > 1 else torch.ones((), dtype=torch.float64)
    return _out((a - mu) / (sd + EPS), rewards_B)


def centred_rank(rewards_B: Tensor, group_B: Tensor, include_B: Tensor | None = None) -> Tensor:
    """Centred rank in ``[-1, 1]`` within each group, ties at their average rank:

    ``rank_i = #{j != i: R_j < R_i} + 1/2 #{j != i: R_j = R_i}`` over the included rows j of i's group, ``m_i`` the
    number of those rows, ``u_i = 2 rank_i / m_i - 1`` (0 when ``m_i = 0``). Without ties, for an included row,
    this is FAKER-Air's ``2 (argsort(argsort(R)) / (n - 1) - 1/2)``; ties there get an arbitrary order, here
    their mean (order-insensitive)."""
    _check(rewards_B, group_B, include_B)
    r = rewards_B.to(torch.float64)
    inc = torch.ones_like(r, dtype=torch.bool) if include_B is None else include_B.to(torch.bool)
    same = (group_B[:, None] == group_B[None, :]) & inc[None, :]
    same.fill_diagonal_(False)
    less = (same & (r[None, :] < r[:, None])).sum(1).to(torch.float64)
    tie = (same & (r[None, :] == r[:, None])).sum(1).to(torch.float64)
    m = same.sum(1).to(torch.float64)
    u = torch.where(m > 0, 2.0 * (less + 0.5 * tie) / m.clamp(min=1) - 1.0, torch.zeros_like(r))
    return _out(u, rewards_B)


def rank_ema(rewards_B: Tensor, group_B: Tensor, include_B: Tensor | None = None, *, ema_mean: float,
             ema_var: float, alpha: float, coeff: float) -> tuple[Tensor, float, float]:
    """FAKER-Air's advantage with its EMA state passed in and returned (``grpo_train.py`` main loop):

    ``Rbar`` the mean reward of the included rows, ``m' = (1 - alpha) m + alpha Rbar``,
    ``v' = (1 - alpha) v + alpha (Rbar - m')^2``, ``A_ema_i = (R_i - m') / (sqrt(v') + 1e-6)`` and
    ``A_i = (1 - coeff) u_i + coeff A_ema_i`` with ``u`` the ``centred_rank``. Returns ``(A, m', v')``; with no
    included row the state is unchanged."""
    _check(rewards_B, group_B, include_B)
    r = rewards_B.to(torch.float64)
    inc = torch.ones_like(r, dtype=torch.bool) if include_B is None else include_B.to(torch.bool)
    if inc.any():
        rbar = float(r[inc].mean())
        ema_mean = (1.0 - alpha) * ema_mean + alpha * rbar
        ema_var = (1.0 - alpha) * ema_var + alpha * (rbar - ema_mean) ** 2
    a_ema = (r - ema_mean) / (ema_var ** 0.5 + EPS)
    a = (1.0 - coeff) * centred_rank(r, group_B, include_B).to(torch.float64) + coeff * a_ema
    return _out(a, rewards_B), ema_mean, ema_var


STATEFUL_ADVANTAGES = ("rank_ema",)
"""Estimators that carry state across steps; the trainer binds them (tether/train/classwise.py)."""

ADVANTAGES: dict[str, AdvantageFn] = {"grpo": grpo, "dr_grpo": dr_grpo, "rloo": rloo, "reinforce_pp": reinforce_pp}


def get_advantage(name: str) -> AdvantageFn:
    try:
        return ADVANTAGES[name]
    except KeyError:
        raise ValueError(f"unknown advantage estimator '{name}'; valid: {', '.join(sorted(ADVANTAGES))}") from None


def advantage_metrics(advantages_B: Tensor, include_B: Tensor | None = None) -> dict[str, Tensor]:
    """``advantage/mean`` and ``advantage/std`` (unbiased, 0 with fewer than two rows) of the sequence advantages
    of the rows that entered the estimator's statistics (``include_B``; None: all), detached. ``reinforce_pp`` whitens over the batch, so its std is 1 whenever the rewards
    differ; a group-normalised estimator's is below 1."""
    a = advantages_B.detach().to(torch.float64)
    a = a if include_B is None else a[include_B.to(torch.bool)]
    zero = torch.zeros((), dtype=torch.float64)
    mean = a.mean() if a.numel() else zero
    std = a.std() if a.numel() > 1 else zero
    return {"advantage/mean": mean, "advantage/std": std}


def broadcast_to_tokens(advantages_B: Tensor, mask_BT: Tensor) -> Tensor:
    """``A_{i,t} = A_i * m_{i,t}``."""
    return advantages_B[:, None].to(torch.float64 if not advantages_B.is_floating_point() else advantages_B.dtype) * mask_BT
