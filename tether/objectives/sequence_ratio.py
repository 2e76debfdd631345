"""Sequence-level and cumulative-token ratio objectives: GSPO and CTPO (plain and CTPO-LA).

Both use a stop-gradient ratio (``ratios.gspo_log_ratio`` / ``ratios.cumulative_log_ratio``):
the *value* on token ``t`` is the sequence (GSPO) or prefix (CTPO) ratio, the *gradient* is
``value * grad log pi_theta(y_t)``. Per-token losses are un-aggregated ``[B, T]`` tensors.
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import Tensor

from tether.objectives.aggregation import AggMode, aggregate
from tether.objectives.inputs import LossInputs, masked_mean
from tether.objectives.policy_gradient import policy_metrics, ppo_clip_loss
from tether.objectives.ratios import cumulative_log_ratio, gspo_log_ratio, masked_positions
from tether.objectives.registry import Preset, register


class CumMode(str, Enum):
    """How CTPO accumulates token log-ratios along the response."""

    CUMPROD = "cumprod"
    GEOMEAN = "geomean"


class CumClip(str, Enum):
    """Which trust region CTPO applies to the cumulative ratio."""

    LA = "la"
    """Position-adaptive log-space clip (CTPO-LA, the paper's method)."""
    PPO = "ppo"
    """Plain PPO clip ``clip(rho, 1-eps_low, 1+eps_high)`` with optional dual clip."""


def _parse(enum: type[Enum], value: object, field: str) -> Enum:
    try:
        return enum(value)
    except ValueError:
        valid = ", ".join(m.value for m in enum)
        raise ValueError(f"objective hyper-parameter '{field}': unknown value '{value}'; valid: {valid}") from None


def ctpo_la_loss(
    log_rho_BT: Tensor,
    advantages_BT: Tensor,
    mask_BT: Tensor,
    *,
    c_low: float,
    c_high: float,
    c_c: float,
    power: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CTPO-LA position-adaptive log-space clip (horizon-llm/CTPO ``_compute_policy_loss_cum_token_la_impl``).

    With ``p_t = sum_{j<=t} m_j`` (1-indexed position among loss tokens) and
    ``sigma_t = max(p_t, 1) ** power``:

    - ``rho~_t = exp(log_rho_t)`` (the caller's gradient path, normally the cumulative ratio);
    - ``rho^c_t = exp(clamp(log_rho_t, -c_low sigma_t, +c_high sigma_t))``;
    - ``C_t = exp(c_c sigma_t)`` (dual-clip threshold);
    - ``l_t = max(-A rho~_t, -A rho^c_t)`` if ``A >= 0``, else ``min(-A C_t, max(-A rho~_t, -A rho^c_t))``.

    On a length-1 sequence (``sigma = 1``) this is exactly PPO with
    ``eps_low = 1 - exp(-c_low)``, ``eps_high = exp(c_high) - 1`` and dual clip ``c = exp(c_c)``.
    Metrics (``ctpo/``): ``clipfrac`` (tokens where the clipped branch is taken), ``clipfrac_lower``
    (dual-clip hits), ``la_scale_mean``, ``clip_low_mean`` / ``clip_high_mean`` (mean ``exp(-+c sigma)``).
    """
    A = advantages_BT.detach()
    sigma = masked_positions(mask_BT).clamp(min=1).to(log_rho_BT.dtype) ** power
    lo, hi = -c_low * sigma, c_high * sigma
    rho = torch.exp(log_rho_BT)
    rho_c = torch.exp(torch.clamp(log_rho_BT, min=lo, max=hi))
    l1 = -A * rho
    l2 = -A * rho_c
    loss = torch.maximum(l1, l2)
    l3 = -A * torch.exp(c_c * sigma)
    dual = (A < 0) & (l3 < loss)
    loss = torch.where(A < 0, torch.minimum(loss, l3), loss)
    dt = rho.dtype
    metrics = {
        "ctpo/clipfrac": masked_mean((l2 > l1).to(dt), mask_BT),
        "ctpo/clipfrac_lower": masked_mean(dual.to(dt), mask_BT),
        "ctpo/la_scale_mean": masked_mean(sigma.detach(), mask_BT),
        "ctpo/clip_low_mean": masked_mean(torch.exp(lo).detach(), mask_BT),
        "ctpo/clip_high_mean": masked_mean(torch.exp(hi).detach(), mask_BT),
    }
    return loss, {k: v.detach() for k, v in metrics.items()}


def _agg(inputs: LossInputs, loss_BT: Tensor, agg: str) -> Tensor:
    return aggregate(
        loss_BT, inputs.mask_BT, agg, num_tokens=inputs.num_tokens, num_seqs=inputs.num_seqs, horizon=inputs.horizon
    )


def gspo(inputs: LossInputs, *, agg: str, eps_low: float, eps_high: float) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO (Zheng et al. 2025; verl ``compute_policy_loss_gspo``): PPO clip on the geometric-mean
    sequence ratio ``s_i`` in GSPO-token form (value ``s_i``, gradient ``s_i grad log pi_theta(y_t)``),
    no dual clip, aggregation fixed to ``seq-mean-token-mean`` (verl forces it; tether refuses others).
    """
    if AggMode.parse(agg) is not AggMode.SEQ_MEAN_TOKEN_MEAN:
        raise ValueError(f"objective 'gspo' hyper-parameter 'agg' must be 'seq-mean-token-mean' (GSPO), got '{agg}'")
    lr = gspo_log_ratio(inputs.logp_theta_BT, inputs.logp_old_BT, inputs.mask_BT)
    loss_BT, metrics = ppo_clip_loss(lr, inputs.advantages_BT, inputs.mask_BT, eps_low=eps_low, eps_high=eps_high)
    metrics["gspo/seq_ratio_mean"] = masked_mean(torch.exp(lr.detach()), inputs.mask_BT)
    return _agg(inputs, loss_BT, agg), {**metrics, **policy_metrics(inputs)}


def ctpo(
    inputs: LossInputs,
    *,
    agg: str,
    mode: str,
    clip: str,
    c_low: float,
    c_high: float,
    c_c: float,
    power: float,
    eps_low: float,
    eps_high: float,
    dual_clip_c: float | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CTPO on the cumulative-token ratio ``rho_t`` (``mode``: cumprod | geomean).

    ``clip='la'``: CTPO-LA (``ctpo_la_loss`` with ``c_low, c_high, c_c, power``);
    ``clip='ppo'``: ``ppo_clip_loss`` on ``rho_t`` with ``eps_low, eps_high, dual_clip_c``.
    The constants of the other clip are ignored. Gradient: ``rho_t grad log pi_theta(y_t)`` inside the clip.
    """
    cum_mode = _parse(CumMode, mode, "mode")
    cum_clip = _parse(CumClip, clip, "clip")
    lr = cumulative_log_ratio(
        inputs.logp_theta_BT, inputs.logp_old_BT, inputs.mask_BT, geomean=cum_mode is CumMode.GEOMEAN
    )
    if cum_clip is CumClip.LA:
        loss_BT, metrics = ctpo_la_loss(
            lr, inputs.advantages_BT, inputs.mask_BT, c_low=c_low, c_high=c_high, c_c=c_c, power=power
        )
    else:
        loss_BT, metrics = ppo_clip_loss(
            lr, inputs.advantages_BT, inputs.mask_BT, eps_low=eps_low, eps_high=eps_high, dual_clip_c=dual_clip_c
        )
    metrics["ctpo/cum_ratio_mean"] = masked_mean(torch.exp(lr.detach()), inputs.mask_BT)
    return _agg(inputs, loss_BT, agg), {**metrics, **policy_metrics(inputs)}


register(Preset(
    name="gspo",
    description="GSPO: PPO clip on the length-normalised sequence ratio (GSPO-token form), eps 3e-4/4e-4.",
    fn=gspo,
    defaults={"agg": "seq-mean-token-mean", "eps_low": 3e-4, "eps_high": 4e-4},
    advantage="grpo",
    source=(
        "Zheng et al. 2025 (GSPO, arXiv 2507.18071: clip ranges 3e-4 / 4e-4); verl compute_policy_loss_gspo "
        "(no dual clip) and examples/gspo_trainer (clip_ratio_low 3e-4, clip_ratio_high 4e-4, seq-mean-token-mean)"
    ),
    equation=(
        "log s_i = mean_t m log r_t; s_it = sg(s_i) pi_theta(y_t)/sg(pi_theta(y_t)); "
        "l_t = max(-A s_it, -A clip(s_it, 1-eps_low, 1+eps_high)); seq-mean-token-mean"
    ),
))

_CTPO_DEFAULTS = {
    "agg": "token-mean",
    "mode": "cumprod",
    "clip": "la",
    "c_low": 0.025,
    "c_high": 0.05,
    "c_c": 0.05,
    "power": 0.5,
    "eps_low": 0.2,
    "eps_high": 0.2,
    "dual_clip_c": 3.0,
}

register(Preset(
    name="ctpo",
    description="CTPO-LA: cumulative prefix ratio with a position-adaptive log-space clip (cumprod, pow 0.5).",
    fn=ctpo,
    defaults=_CTPO_DEFAULTS,
    advantage="grpo",
    source=(
        "arXiv 2605.07331 (CTPO); horizon-llm/CTPO core_algos.py _compute_policy_loss_cum_token_la_impl, "
        "ctpo.sh (c_low 0.025, c_high 0.05, c_c 0.05, pow 0.5, token-mean)"
    ),
    equation=(
        "log rho_t = sum_{j<=t} m_j log r_j (value; grad rho_t grad log pi_t); sigma_t = p_t^pow; "
        "rho^c = exp(clamp(log rho, -c_low sigma, c_high sigma)); l = max(-A rho, -A rho^c); "
        "A<0: min(., -A exp(c_c sigma))"
    ),
))
register(Preset(
    name="ctpo_geomean",
    description="CTPO, geometric-mean prefix ratio, LA clip narrowing with position (pow -0.5).",
    fn=ctpo,
    defaults={**_CTPO_DEFAULTS, "mode": "geomean", "power": -0.5},
    advantage="grpo",
    source=(
        "horizon-llm/CTPO core_algos.py (cum-token-geomean; code comment recommends pow -0.5 for geomean); "
        "arXiv 2605.07331"
    ),
    equation=(
        "log rho_t = (sum_{j<=t} m_j log r_j)/p_t; sigma_t = p_t^-0.5; "
        "rho^c = exp(clamp(log rho, -c_low sigma, c_high sigma)); l = max(-A rho, -A rho^c); "
        "A<0: min(., -A exp(c_c sigma))"
    ),
))
