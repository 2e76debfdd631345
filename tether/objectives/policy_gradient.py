"""Score-function and PPO-clip losses, and the presets built from them alone.

Per-token losses here are *un-aggregated* ``[B, T]`` tensors; presets reduce them with
``aggregation.aggregate``. Metrics are detached scalars averaged over loss tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tether.objectives.aggregation import aggregate
from tether.objectives.inputs import LossInputs, masked_mean
from tether.objectives.ratios import token_log_ratio
from tether.objectives.registry import Preset, register


def reinforce_loss(
    logp_theta_BT: Tensor, advantages_BT: Tensor, weight_BT: Tensor | None = None
) -> Tensor:
    """Score-function loss ``l_t = -sg(w_t) * A_t * log pi_theta(y_t)`` (``w = 1`` if not given).

    Gradient: ``-w_t A_t grad log pi_theta(y_t)``; ``w`` is always detached.
    """
    w = 1.0 if weight_BT is None else weight_BT.detach()
    return -(w * advantages_BT.detach()) * logp_theta_BT


def ppo_clip_loss(
    log_ratio_BT: Tensor,
    advantages_BT: Tensor,
    mask_BT: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip_c: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate with asymmetric epsilons and optional dual clip (verl ``vanilla``).

    ``r = exp(log_ratio)``; ``l1 = -A r``; ``l2 = -A clip(r, 1-eps_low, 1+eps_high)``;
    ``l_clip = max(l1, l2)``; with dual clip ``c``: ``l = min(l_clip, -A c)`` where ``A < 0``.
    The log-ratio's gradient path is the caller's (token, GSPO, CTPO, ...).
    ``eps = inf`` disables the clip: ``l = -A r``.
    Metrics: ``pg/clipfrac`` (tokens where ``l2 > l1``), ``pg/clipfrac_lower`` (dual-clip hits).
    """
    A = advantages_BT.detach()
    ratio = torch.exp(log_ratio_BT)
    l1 = -A * ratio
    l2 = -A * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(l1, l2)
    metrics = {"pg/clipfrac": masked_mean((l2 > l1).to(ratio.dtype), mask_BT)}
    if dual_clip_c is not None:
        l3 = -A * dual_clip_c
        dual = (A < 0) & (l3 < loss)
        loss = torch.where(A < 0, torch.minimum(loss, l3), loss)
        metrics["pg/clipfrac_lower"] = masked_mean(dual.to(ratio.dtype), mask_BT)
    return loss, metrics


def policy_metrics(inputs: LossInputs) -> dict[str, Tensor]:
    """Diagnostics every preset reports (methods.md §0): ``ppo_kl`` and ratio extremes vs pi_old."""
    lr = token_log_ratio(inputs.logp_theta_BT.detach(), inputs.logp_old_BT, inputs.mask_BT)
    valid = inputs.mask_BT.bool()
    ratio = torch.exp(lr)
    big = torch.finfo(ratio.dtype).max
    any_valid = valid.any()
    zero = torch.zeros((), dtype=ratio.dtype, device=ratio.device)
    return {
        "pg/ppo_kl": masked_mean(-lr, inputs.mask_BT),
        "pg/ratio_mean": masked_mean(ratio, inputs.mask_BT),
        "pg/ratio_max": torch.where(any_valid, torch.where(valid, ratio, -big).max(), zero),
        "pg/ratio_min": torch.where(any_valid, torch.where(valid, ratio, big).min(), zero),
    }


def _agg(inputs: LossInputs, loss_BT: Tensor, agg: str) -> Tensor:
    return aggregate(
        loss_BT, inputs.mask_BT, agg, num_tokens=inputs.num_tokens, num_seqs=inputs.num_seqs, horizon=inputs.horizon
    )


def reinforce(inputs: LossInputs, *, agg: str) -> tuple[Tensor, dict[str, Tensor]]:
    """REINFORCE: ``l_t = -A_t log pi_theta(y_t)``; on-policy score function, no ratio."""
    loss = _agg(inputs, reinforce_loss(inputs.logp_theta_BT, inputs.advantages_BT), agg)
    return loss, policy_metrics(inputs)


def ppo(
    inputs: LossInputs, *, agg: str, eps_low: float, eps_high: float, dual_clip_c: float | None
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip on the token ratio ``r_t = pi_theta / pi_old`` (dual clip optional)."""
    lr = token_log_ratio(inputs.logp_theta_BT, inputs.logp_old_BT, inputs.mask_BT)
    loss_BT, metrics = ppo_clip_loss(
        lr, inputs.advantages_BT, inputs.mask_BT, eps_low=eps_low, eps_high=eps_high, dual_clip_c=dual_clip_c
    )
    return _agg(inputs, loss_BT, agg), {**metrics, **policy_metrics(inputs)}


register(Preset(
    name="reinforce",
    description="On-policy REINFORCE with a leave-one-out baseline; no ratio, no clip.",
    fn=reinforce,
    defaults={"agg": "token-mean"},
    advantage="rloo",
    source="Williams 1992; Ahmadian et al. 2024 (RLOO)",
    equation="l_t = -A_t log pi_theta(y_t)",
))
register(Preset(
    name="ppo",
    description="PPO clipped surrogate with dual clip (verl defaults eps=0.2, c=3).",
    fn=ppo,
    defaults={"agg": "token-mean", "eps_low": 0.2, "eps_high": 0.2, "dual_clip_c": 3.0},
    advantage="grpo",
    source="Schulman et al. 2017; Ye et al. 2020 (dual clip); verl compute_policy_loss_vanilla",
    equation="l_t = max(-A r_t, -A clip(r_t, 1-eps_low, 1+eps_high)); A<0: min(., -A c)",
))
register(Preset(
    name="grpo",
    description="GRPO: group z-score advantages, PPO clip, seq-mean-token-mean aggregation.",
    fn=ppo,
    defaults={"agg": "seq-mean-token-mean", "eps_low": 0.2, "eps_high": 0.2, "dual_clip_c": None},
    advantage="grpo",
    source="Shao et al. 2024 (DeepSeekMath); verl compute_grpo_outcome_advantage",
    equation="A_i = (R_i - mean_g R)/(std_g R + 1e-6); l_t = max(-A r_t, -A clip(r_t, 1-eps, 1+eps))",
))
register(Preset(
    name="dr_grpo",
    description="Dr.GRPO: advantages without std, constant length normaliser.",
    fn=ppo,
    defaults={"agg": "seq-mean-token-sum-norm", "eps_low": 0.2, "eps_high": 0.2, "dual_clip_c": None},
    advantage="dr_grpo",
    source="Liu et al. 2025 (Understanding R1-Zero-like training)",
    equation="A_i = R_i - mean_g R; loss = sum_i sum_t m l_t / (N_seq L)",
))
register(Preset(
    name="dapo",
    description="DAPO: clip-higher (0.2/0.28), global token-mean, no KL (pair with dynamic sampling).",
    fn=ppo,
    defaults={"agg": "token-mean", "eps_low": 0.2, "eps_high": 0.28, "dual_clip_c": None},
    advantage="grpo",
    source="Yu et al. 2025 (DAPO); FeynRL algs/DAPO",
    equation="l_t = max(-A r_t, -A clip(r_t, 1-0.2, 1+0.28)); token-mean over the global batch",
))
