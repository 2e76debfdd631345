"""Hybrid-policy presets: on-policy rollouts mixed with external expert traces in one group.

``LossInputs.expert_B`` marks the expert rows. Both presets use the ``dr_grpo`` advantage with the
group mean over on-policy rows only (the trainer passes ``include_B = ~expert_B`` to the advantage
estimator), so the expert row's advantage is ``R_e - mean_on-policy R``.

Per-token losses on expert and on-policy rows are combined into one ``[B, T]`` tensor and reduced
once with ``aggregate`` over ``mask_BT``: the normalisers count all loss tokens (expert rows
included), which keeps micro-batching exact with the global ``num_tokens`` / ``num_seqs``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tether.objectives.aggregation import aggregate
from tether.objectives.closed_form import elementwise_loss
from tether.objectives.inputs import LossInputs, float_mask, indicator, masked_mean, masked_means
from tether.objectives.policy_gradient import _ppo_clip, policy_metrics
from tether.objectives.ratios import token_log_ratio
from tether.objectives.registry import Preset, register


def _agg(inputs: LossInputs, loss_BT: Tensor, agg: str) -> Tensor:
    return aggregate(
        loss_BT, inputs.mask_BT, agg, num_tokens=inputs.num_tokens, num_seqs=inputs.num_seqs, horizon=inputs.horizon
    )


def _row_masks(inputs: LossInputs) -> tuple[Tensor, Tensor]:
    """``(expert rows as [B, 1] bool, on-policy loss mask [B, T] bool)``."""
    expert = inputs.expert_B.to(device=inputs.mask_BT.device).bool()[:, None]
    return expert, inputs.mask_BT.bool() & ~expert


def calibrl_guidance_loss(
    logp_theta_BT: Tensor,
    logp_expert_old_BT: Tensor,
    advantages_BT: Tensor,
    mask_BT: Tensor,
    *,
    slope: float = 0.5,
) -> Tensor:
    """CalibRL expert-guided term ``g_t = |A| LeakyReLU_slope(-(2 pass - 1)(log pi_theta(y_t) - log pi_old(e_t)))``.

    ``pass = 1[A > 0]`` (see the ``calibrl`` preset for why the sign of A stands in for ``R > 0.1``).
    Correct samples (pass) are pushed up towards/above the expert baseline: gradient w.r.t.
    ``log pi_theta`` is ``-|A|`` below it and ``-slope |A|`` above it; incorrect samples mirror this.
    0 on masked positions; un-aggregated.
    """
    A = advantages_BT.detach()
    base = logp_expert_old_BT.detach()
    valid = mask_BT.bool()

    def value_and_grad(x: Tensor) -> tuple[Tensor, Tensor]:
        # d g / d log pi_theta = |A| LeakyReLU'(u) (-sign) = -A * (1 if u > 0 else slope) on loss tokens
        neg_sign = 1.0 - 2.0 * indicator(torch.gt, A, 0.0)  # -(2 pass - 1), exactly -1 or 1
        u = torch.where(valid, neg_sign * (x - base), 0.0)
        g = torch.where(valid, A.abs() * torch.nn.functional.leaky_relu(u, negative_slope=slope), 0.0)
        slope_u = torch.lerp(torch.full_like(u, slope), torch.ones_like(u), indicator(torch.gt, u, 0.0))
        grad = torch.where(valid, -A * slope_u, 0.0)
        return g, grad

    return elementwise_loss(logp_theta_BT, value_and_grad)[0]


def calibrl(
    inputs: LossInputs,
    *,
    agg: str,
    eps_low: float,
    eps_high: float,
    dual_clip_c: float | None,
    guide_coef: float,
    guide_slope: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CalibRL: dual-clip PPO on on-policy rows + ``guide_coef * agg(g)`` (expert-baseline calibration).

    Expert rows carry no loss of their own; they enter only through ``logp_expert_old_BT`` (pi_old
    log-probs of the group's expert response, aligned by position, 0 beyond its length).
    """
    expert, m_on = _row_masks(inputs)
    # the token log-ratio over all loss tokens (shared with the policy metrics); the 0/1 on-policy
    # weight zeroes the PPO loss and its gradient on expert rows and padding (finite there)
    lr = token_log_ratio(inputs.logp_theta_BT, inputs.logp_old_BT, inputs.mask_BT)
    pg_BT, ratio, metrics = _ppo_clip(
        lr, inputs.advantages_BT, m_on, eps_low=eps_low, eps_high=eps_high, dual_clip_c=dual_clip_c,
        weight_BT=float_mask(m_on, lr.dtype),
    )
    g_BT = calibrl_guidance_loss(
        inputs.logp_theta_BT, inputs.logp_expert_old_BT, inputs.advantages_BT, m_on, slope=guide_slope
    )
    pg = _agg(inputs, pg_BT, agg)
    guided = _agg(inputs, g_BT, agg)
    above = indicator(torch.gt, inputs.logp_theta_BT.detach(), inputs.logp_expert_old_BT.detach(), pg_BT.dtype)
    metrics.update({
        "calibrl/pg_loss": pg.detach(),
        "calibrl/guided_loss": guided.detach(),
        "calibrl/above_expert_frac": masked_mean(above, m_on),
        "calibrl/expert_frac": inputs.expert_B.to(pg_BT.dtype).mean(),
    })
    return pg + guide_coef * guided, {**metrics, **policy_metrics(inputs, log_ratio_BT=lr, ratio_BT=ratio)}


def rlplus_off_policy_loss(
    logp_theta_BT: Tensor, logp_old_BT: Tensor, advantages_BT: Tensor, mask_BT: Tensor, *, exploration_power: float = 0.5
) -> tuple[Tensor, Tensor]:
    """RL-PLUS expert-token loss ``l_t = -r^MIS_t A^c_t``; returns ``(loss_BT, r^MIS_BT)``.

    ``r^MIS = pi_theta(e_t) / (0.75 pi_old(e_t) + 0.25)`` with the probability ``pi_theta`` itself
    (not detached); ``A^c = A (1 - sg(pi_theta(e_t)))^power``. Gradient w.r.t. ``log pi_theta``:
    ``-A^c r^MIS``. 0 on masked positions.
    """
    m = mask_BT.bool()
    A = advantages_BT.detach()
    p_old = torch.exp(torch.where(m, logp_old_BT.detach(), 0.0))

    def value_and_grad(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # d r / d log pi_theta = r, so d l / d log pi_theta = -A^c r on loss tokens (A^c is detached)
        p = torch.exp(torch.where(m, x, 0.0))
        r = p / (0.75 * p_old + 0.25)
        a_c = A * (1.0 - p).clamp(min=0.0) ** exploration_power
        loss = torch.where(m, -r * a_c, 0.0)
        return loss, loss, r  # the loss is -A^c r: it is its own derivative

    loss, r = elementwise_loss(logp_theta_BT, value_and_grad)
    return loss, r


def rl_plus(
    inputs: LossInputs, *, agg: str, eps_low: float, eps_high: float, exploration_power: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """RL-PLUS: multiple-importance-sampling loss on expert rows, (unclipped) IS-PPO on on-policy rows."""
    expert, m_on = _row_masks(inputs)
    m_off = inputs.mask_BT.bool() & expert
    # the token log-ratio over all loss tokens (shared with the policy metrics); the 0/1 on-policy
    # weight zeroes the PPO loss and its gradient on expert rows and padding (finite there)
    lr = token_log_ratio(inputs.logp_theta_BT, inputs.logp_old_BT, inputs.mask_BT)
    on_BT, ratio, metrics = _ppo_clip(
        lr, inputs.advantages_BT, m_on, eps_low=eps_low, eps_high=eps_high, dual_clip_c=None,
        weight_BT=float_mask(m_on, lr.dtype),
    )
    off_BT, r_off = rlplus_off_policy_loss(
        inputs.logp_theta_BT, inputs.logp_old_BT, inputs.advantages_BT, m_off, exploration_power=exploration_power
    )
    loss_BT = on_BT + off_BT
    with torch.no_grad():
        p = inputs.logp_theta_BT.detach().exp()
        metrics.update({
            "rlplus/on_pg_loss": _agg(inputs, on_BT.detach(), agg),
            "rlplus/off_pg_loss": _agg(inputs, off_BT.detach(), agg),
            **masked_means({"rlplus/off_policy_prob": p, "rlplus/off_ratio_mean": r_off.detach()}, m_off),
            "rlplus/on_policy_prob": masked_mean(p, m_on),
        })
    return _agg(inputs, loss_BT, agg), {**metrics, **policy_metrics(inputs, log_ratio_BT=lr, ratio_BT=ratio)}


register(Preset(
    name="calibrl",
    description=(
        "CalibRL: dual-clip PPO on on-policy rows plus an expert-baseline calibration term "
        "|A| LeakyReLU_0.5 pushing log pi_theta towards/away from pi_old's expert log-probs."
    ),
    fn=calibrl,
    defaults={
        "agg": "token-mean", "eps_low": 0.2, "eps_high": 0.2, "dual_clip_c": 3.0,
        "guide_coef": 0.1, "guide_slope": 0.5,
    },
    advantage="dr_grpo",
    source=(
        "CalibRL (ICLR 2026, arXiv 2602.20197); zhh6425/CalibRL compute_mix_policy_loss (expert-guided). "
        "Deviation: pass = 1[A > 0] instead of 1[R > 0.1]; identical for 0/1 rewards (|A| = 0 otherwise)"
    ),
    requires=("expert_B", "logp_expert_old_BT"),
    equation=(
        "non-expert rows: l_t = l_PPO-dual-clip(r_t, A) ; g_t = |A| LeakyReLU_0.5(-(2 pass - 1)(log pi_theta(y_t) "
        "- log pi_old(e_t))), pass = 1[A > 0] ; L = agg(l) + 0.1 agg(g)"
    ),
))
register(Preset(
    name="rl_plus",
    description=(
        "RL-PLUS: multiple-importance-sampling ratio pi_theta/(0.75 pi_old + 0.25) with exploration advantage "
        "A(1 - pi_theta)^0.5 on expert tokens; unclipped IS policy gradient on on-policy tokens."
    ),
    fn=rl_plus,
    defaults={
        "agg": "seq-mean-token-sum-norm", "eps_low": float("inf"), "eps_high": float("inf"),
        "exploration_power": 0.5,
    },
    advantage="dr_grpo",
    source=(
        "Dong et al. 2025 (RL-PLUS); YihongDong/RL-PLUS rlplus_core_alg.compute_token_on_off_policy_loss "
        "(loss_remove_clip=True, loss_remove_token_mean=True)"
    ),
    requires=("expert_B",),
    equation=(
        "expert rows: l_t = -pi_theta(e_t)/(0.75 pi_old(e_t) + 0.25) * A (1 - sg(pi_theta(e_t)))^0.5 ; "
        "on-policy rows: l_t = -A r_t (eps = inf: no clip)"
    ),
))
