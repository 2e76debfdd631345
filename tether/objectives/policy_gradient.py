"""Score-function and PPO-clip losses, and the presets built from them alone.

Per-token losses here are *un-aggregated* ``[B, T]`` tensors; presets reduce them with
``aggregation.aggregate``. Metrics are detached scalars averaged over loss tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from tether.objectives.aggregation import aggregate
from tether.objectives.closed_form import elementwise_loss
from tether.objectives.inputs import LossInputs, float_mask, indicator, masked_means, max_or_zero, min_or_zero
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


def clipped_surrogate(
    log_ratio_BT: Tensor,
    advantages_BT: Tensor,
    ratio_clipped: Callable[[Tensor, Tensor], Tensor],
    *,
    dual_BT: Tensor | float | None = None,
    weight_BT: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The pessimistic surrogate shared by PPO and CTPO-LA, with its derivative in closed form.

    ``r = exp(x)`` with ``x = log_ratio``; ``r_c = ratio_clipped(x, r)`` (a clip of ``r`` that equals
    ``r`` exactly inside the trust region, returned as a new tensor); ``l1 = -A r``; ``l2 = -A r_c``;
    ``l = max(l1, l2)``; with a dual clip ``c`` (a number or a per-token tensor): ``l = min(l, -A c)`` where ``A < 0``;
    with a detached weight: ``l = w * l``. Returns ``(l, r, clipped, dual)``: ``clipped`` is
    ``1[l2 > l1]`` and ``dual`` (``None`` without a dual clip) ``1[A < 0 and -A c < max(l1, l2)]``,
    both as 0./1. of ``r``'s dtype; ``r`` and the indicators are detached.

    Gradient (``closed_form.elementwise_loss``; one saved tensor):
    ``d l / d x = w * (-A r) * (1 - max(clipped, dual))``. Inside the trust region ``r_c = r``, so
    both branches of ``max`` agree and each carries ``d(-A r)/dx = -A r``; where ``l2 > l1`` the
    clipped branch is constant in ``x`` (``r`` is outside the clip) and where the dual clip bites
    ``-A c`` is constant. This is the gradient autograd records op by op, except on exact floating
    point ties outside the trust region (``-A r == -A r_c`` with ``r != r_c``, or ``r == c``), where
    autograd splits the gradient in halves between the two equal branches.
    Selections are written as products with 0/1 indicators, exact while ``x`` is finite (every caller
    clamps it: at +-20 for token ratios, at +10 for the stop-gradient sequence and prefix ratios).
    """
    A = advantages_BT.detach()
    w = None if weight_BT is None else weight_BT.detach()

    def value_and_grad(x: Tensor) -> tuple[Tensor, ...]:
        # (in-place updates reuse buffers of intermediates that are not needed again)
        neg_A = -A
        ratio = torch.exp(x)
        l1 = neg_A * ratio
        l2 = ratio_clipped(x, ratio).mul_(neg_A)
        loss = torch.maximum(l1, l2)
        clipped = indicator(torch.gt, l2, l1)
        keep = 1.0 - clipped
        dual = None
        if dual_BT is not None:
            l3 = neg_A * dual_BT
            dual = indicator(torch.lt, l3, loss).mul_(indicator(torch.lt, A, 0.0, loss.dtype))
            loss = torch.lerp(loss, l3, dual)  # = where(A < 0, min(loss, l3), loss)
            keep.sub_(dual).clamp_(min=0.0)  # 1 - max(clipped, dual)
        grad = l1.mul_(keep)
        if w is not None:
            loss = w * loss
            grad.mul_(w)
        extra = (ratio, clipped) if dual is None else (ratio, clipped, dual)
        return (loss, grad, *extra)

    out = elementwise_loss(log_ratio_BT, value_and_grad)
    return (*out, None) if dual_BT is None else tuple(out)


def ppo_clip_loss(
    log_ratio_BT: Tensor,
    advantages_BT: Tensor,
    mask_BT: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip_c: float | None = None,
    weight_BT: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate with asymmetric epsilons and optional dual clip (verl ``vanilla``).

    ``r = exp(log_ratio)``; ``l1 = -A r``; ``l2 = -A clip(r, 1-eps_low, 1+eps_high)``;
    ``l_clip = max(l1, l2)``; with dual clip ``c``: ``l = min(l_clip, -A c)`` where ``A < 0``.
    ``weight_BT`` (detached, optional) multiplies the per-token loss: ``w * l``.
    The log-ratio's gradient path is the caller's (token, GSPO, CTPO, ...).
    ``eps = inf`` disables the clip: ``l = -A r``.
    Gradient w.r.t. the log-ratio: ``w * (-A r)`` where neither clip bites, else 0 (see
    ``clipped_surrogate``).
    Metrics: ``pg/clipfrac`` (tokens where ``l2 > l1``), ``pg/clipfrac_lower`` (dual-clip hits).
    """
    loss, _, metrics = _ppo_clip(
        log_ratio_BT, advantages_BT, mask_BT, eps_low=eps_low, eps_high=eps_high, dual_clip_c=dual_clip_c,
        weight_BT=weight_BT,
    )
    return loss, metrics


def _ppo_clip(
    log_ratio_BT: Tensor,
    advantages_BT: Tensor,
    mask_BT: Tensor,
    *,
    eps_low: float,
    eps_high: float,
    dual_clip_c: float | None,
    weight_BT: Tensor | None = None,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """``ppo_clip_loss`` that also returns the (detached) ratio ``r`` for reuse in metrics."""
    lo, hi = 1.0 - eps_low, 1.0 + eps_high
    loss, ratio, clipped, dual = clipped_surrogate(
        log_ratio_BT, advantages_BT, lambda x, r: torch.clamp(r, lo, hi), dual_BT=dual_clip_c, weight_BT=weight_BT
    )
    flags = {"pg/clipfrac": clipped}
    if dual is not None:
        flags["pg/clipfrac_lower"] = dual
    return loss, ratio, masked_means(flags, mask_BT, dtype=ratio.dtype)


def policy_metrics(
    inputs: LossInputs, *, log_ratio_BT: Tensor | None = None, ratio_BT: Tensor | None = None
) -> dict[str, Tensor]:
    """Diagnostics every preset reports (methods.md §0): ``ppo_kl`` and ratio extremes vs pi_old.

    ``log_ratio_BT`` / ``ratio_BT``: the token log-ratio ``token_log_ratio(logp_theta, logp_old,
    mask)`` and its ``exp``, when the caller has them already (they are recomputed otherwise).
    """
    with torch.no_grad():
        lr = log_ratio_BT
        if lr is None:
            lr = token_log_ratio(inputs.logp_theta_BT.detach(), inputs.logp_old_BT, inputs.mask_BT)
        lr = lr.detach()
        ratio = torch.exp(lr) if ratio_BT is None else ratio_BT.detach()
        m = float_mask(inputs.mask_BT.bool(), ratio.dtype)
        n = m.sum()
        # 0 on loss tokens, -max on padding: ratio + off (ratio - off) is the ratio on loss tokens
        # and -max (+max) on padding, so the plain max (min) is the max (min) over loss tokens
        off = (m - 1.0) * torch.finfo(ratio.dtype).max
        stats = torch.stack([
            torch.dot(lr.reshape(-1), m.reshape(-1)),
            torch.dot(ratio.reshape(-1), m.reshape(-1)),
            max_or_zero(ratio + off),
            min_or_zero(ratio - off),
        ])
        means = stats[:2] / n.clamp(min=1.0)
        extremes = torch.where(n > 0, stats[2:], 0.0)
        return {
            "pg/ppo_kl": -means[0],
            "pg/ratio_mean": means[1],
            "pg/ratio_max": extremes[0],
            "pg/ratio_min": extremes[1],
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
    loss_BT, ratio, metrics = _ppo_clip(
        lr, inputs.advantages_BT, inputs.mask_BT, eps_low=eps_low, eps_high=eps_high, dual_clip_c=dual_clip_c
    )
    return _agg(inputs, loss_BT, agg), {**metrics, **policy_metrics(inputs, log_ratio_BT=lr, ratio_BT=ratio)}


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
