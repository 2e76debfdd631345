"""Weighted score-function objectives: the ratio enters only as a detached weight on log pi_theta.

Unlike PPO (which clips the surrogate and so zeroes the gradient of clipped tokens), these keep
every token's gradient ``-w_t A_t grad log pi_theta(y_t)`` and bound the weight ``w_t`` instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tether.objectives.aggregation import aggregate
from tether.objectives.inputs import LossInputs, masked_mean
from tether.objectives.policy_gradient import policy_metrics, reinforce_loss
from tether.objectives.ratios import token_log_ratio
from tether.objectives.registry import Preset, register


def cispo_loss(
    logp_theta_BT: Tensor,
    logp_old_BT: Tensor,
    advantages_BT: Tensor,
    mask_BT: Tensor,
    *,
    eps_low: float,
    eps_high: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO per-token loss ``l_t = -sg(clip(r_t, 1-eps_low, 1+eps_high)) A_t log pi_theta(y_t)``.

    ``r_t = exp(clamp(log pi_theta - log pi_old, -20, 20))``. Gradient: ``-w_t A_t grad log pi_theta``
    with ``w_t`` the detached clipped ratio. Source: MiniMax-M1 (arXiv 2506.13585, eq. 4-5);
    ROLL actor_pg_worker.py; verl ``compute_policy_loss_cispo``.
    Metrics: ``cispo/clipfrac`` (tokens whose weight was clipped), ``cispo/weight_mean``.
    """
    r = torch.exp(token_log_ratio(logp_theta_BT.detach(), logp_old_BT, mask_BT))
    w = torch.clamp(r, 1.0 - eps_low, 1.0 + eps_high)
    metrics = {
        "cispo/clipfrac": masked_mean((w != r).to(r.dtype), mask_BT),
        "cispo/weight_mean": masked_mean(w, mask_BT),
    }
    return reinforce_loss(logp_theta_BT, advantages_BT, w), metrics


def topr_loss(
    logp_theta_BT: Tensor, logp_old_BT: Tensor, advantages_BT: Tensor, mask_BT: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """TOPR per-token loss (Le Roux et al. 2025, Tapered Off-Policy REINFORCE).

    ``A_t > 0``: ``l_t = -A_t log pi_theta(y_t)`` (plain SFT-like term, weight 1);
    ``A_t <= 0``: ``l_t = -sg(clip(r_t, 0, 1)) A_t log pi_theta(y_t)`` (ratio tapered at 1).
    (``A_t = 0`` contributes nothing either way.) Gradient: ``-w_t A_t grad log pi_theta``.
    The split is on the *advantage* sign: the paper and ROLL (millioniron/ROLL ``actor_pg_worker.py``,
    alibaba/ROLL ``actor_worker.py``: ``scores > 0``) split on the *reward* sign. With 0/1 rewards and a group-mean
    baseline the two agree on every token that contributes; with other rewards they differ (a reward of
    0.3 below its group's mean is tapered here, weight 1 in ROLL).
    Metrics: ``topr/neg_weight_mean`` (mean weight over negative tokens), ``topr/clipfrac``
    (negative tokens with ``r > 1``).
    """
    r = torch.exp(token_log_ratio(logp_theta_BT.detach(), logp_old_BT, mask_BT))
    A = advantages_BT.detach()
    neg = A <= 0
    w = torch.where(neg, torch.clamp(r, 0.0, 1.0), torch.ones_like(r))
    neg_mask = mask_BT.bool() & neg
    metrics = {
        "topr/neg_weight_mean": masked_mean(w, neg_mask),
        "topr/clipfrac": masked_mean((r > 1.0).to(r.dtype), neg_mask),
    }
    return reinforce_loss(logp_theta_BT, A, w), metrics


def _agg(inputs: LossInputs, loss_BT: Tensor, agg: str) -> Tensor:
    return aggregate(
        loss_BT, inputs.mask_BT, agg, num_tokens=inputs.num_tokens, num_seqs=inputs.num_seqs, horizon=inputs.horizon
    )


def cispo(inputs: LossInputs, *, agg: str, eps_low: float, eps_high: float) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO: clipped, detached token IS weight on the score function (``cispo_loss``)."""
    loss_BT, metrics = cispo_loss(
        inputs.logp_theta_BT, inputs.logp_old_BT, inputs.advantages_BT, inputs.mask_BT,
        eps_low=eps_low, eps_high=eps_high,
    )
    return _agg(inputs, loss_BT, agg), {**metrics, **policy_metrics(inputs)}


def topr(inputs: LossInputs, *, agg: str) -> tuple[Tensor, dict[str, Tensor]]:
    """TOPR: weight 1 where ``A > 0``, ``sg(clip(r, 0, 1))`` where ``A <= 0`` (``topr_loss``)."""
    loss_BT, metrics = topr_loss(inputs.logp_theta_BT, inputs.logp_old_BT, inputs.advantages_BT, inputs.mask_BT)
    return _agg(inputs, loss_BT, agg), {**metrics, **policy_metrics(inputs)}


register(Preset(
    name="cispo",
    description="CISPO: score function weighted by the detached clipped token ratio (ROLL eps 0.1/0.1).",
    fn=cispo,
    defaults={"agg": "token-mean", "eps_low": 0.1, "eps_high": 0.1},
    advantage="grpo",
    source=(
        "Chen et al. 2025 (MiniMax-M1, arXiv 2506.13585); defaults from millioniron/ROLL actor_pg_worker.py "
        "(0.1/0.1); the paper itself sets no lower bound (large eps_low) and tunes eps_high only"
    ),
    equation="l_t = -sg(clip(r_t, 1-eps_low, 1+eps_high)) A_t log pi_theta(y_t); token-mean",
))
register(Preset(
    name="topr",
    description="TOPR: REINFORCE where A > 0, ratio tapered at 1 where A <= 0 (the paper: the reward's sign).",
    fn=topr,
    defaults={"agg": "token-mean"},
    advantage="grpo",
    source=(
        "Le Roux et al. 2025 (TOPR, arXiv 2503.14286); millioniron/ROLL actor_pg_worker.py (splits on the "
        "reward sign, scores > 0; tether on the advantage sign: the same split for 0/1 rewards with GRPO advantages)"
    ),
    equation="A>0: l_t = -A_t log pi_theta(y_t); A<=0: l_t = -sg(clip(r_t, 0, 1)) A_t log pi_theta(y_t)",
))
