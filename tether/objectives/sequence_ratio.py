"""Sequence-level and cumulative-token ratio objectives: GSPO, CTPO (plain and CTPO-LA), GMPO (``geo_mean``) and
LUSPO.

Both use a stop-gradient ratio (``ratios.gspo_log_ratio`` / ``ratios.cumulative_log_ratio``):
the *value* on token ``t`` is the sequence (GSPO) or prefix (CTPO) ratio, the *gradient* is
``value * grad log pi_theta(y_t)``. Per-token losses are un-aggregated ``[B, T]`` tensors.
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import Tensor

from tether.objectives.aggregation import AggMode, aggregate
from tether.objectives.inputs import LossInputs, masked_mean, masked_means
from tether.objectives.policy_gradient import _ppo_clip, clipped_surrogate, policy_metrics
from tether.objectives.ratios import (
    LOG_RATIO_CLAMP,
    SG_LOG_RATIO_MAX,
    _cumulative_log_ratio,
    _gspo_log_ratio,
    masked_positions,
    token_log_ratio,
)
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
    loss, _, metrics = _ctpo_la(
        log_rho_BT, advantages_BT, mask_BT, c_low=c_low, c_high=c_high, c_c=c_c, power=power
    )
    return loss, metrics


def _ctpo_la(
    log_rho_BT: Tensor,
    advantages_BT: Tensor,
    mask_BT: Tensor,
    *,
    c_low: float,
    c_high: float,
    c_c: float,
    power: float,
    positions_BT: Tensor | None = None,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """``ctpo_la_loss`` that also returns the detached ``rho`` (for metrics).

    ``sigma``, the bounds and the dual threshold depend on the position ``p_t`` only, so they are
    computed once per position ``p = 0..T`` and read by index. Their loss-token means use the fact
    that the loss tokens of row ``i`` sit at positions ``1..|y_i|``: ``sum_i S(|y_i|) / N`` with
    ``S`` the running sum over positions. The surrogate itself is ``clipped_surrogate`` (gradient
    in closed form).
    """
    dt = log_rho_BT.dtype
    pos = masked_positions(mask_BT) if positions_BT is None else positions_BT
    T = pos.shape[-1]
    sigma_P = torch.arange(T + 1, device=pos.device).clamp(min=1).to(dt) ** power
    tables = torch.stack([-c_low * sigma_P, c_high * sigma_P, torch.exp(c_c * sigma_P)])  # [3, T + 1]
    lo, hi, dual_c = tables.index_select(1, pos.reshape(-1)).view(3, *pos.shape).unbind()
    loss, rho, clipped, dual = clipped_surrogate(
        log_rho_BT, advantages_BT, lambda x, r: torch.exp(torch.clamp(x, min=lo, max=hi)), dual_BT=dual_c
    )
    assert dual is not None
    with torch.no_grad():
        valid = mask_BT.bool()
        # running sums over positions 1..p of sigma, exp(lo), exp(hi); the loss tokens of a row
        # are at positions 1..len, so their sum is the running sum at the row's length
        per_pos = torch.stack([sigma_P, torch.exp(tables[0]), torch.exp(tables[1])])[:, 1:]
        run = torch.cat([per_pos.new_zeros(3, 1), per_pos.cumsum(-1)], dim=-1)  # [3, T + 1]
        len_B = pos[:, -1] if T > 0 else pos.new_zeros(pos.shape[0])
        n = len_B.sum().to(dt).clamp(min=1.0)
        pos_means = run.index_select(1, len_B).sum(-1) / n
        flags = masked_means({"ctpo/clipfrac": clipped, "ctpo/clipfrac_lower": dual}, valid, dtype=dt)
    metrics = {
        **flags,
        "ctpo/la_scale_mean": pos_means[0],
        "ctpo/clip_low_mean": pos_means[1],
        "ctpo/clip_high_mean": pos_means[2],
    }
    return loss, rho, metrics


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
    lr, delta = _gspo_log_ratio(
        inputs.logp_theta_BT, inputs.logp_old_BT, inputs.mask_BT, clamp=LOG_RATIO_CLAMP, max_log=SG_LOG_RATIO_MAX
    )
    loss_BT, s_ratio, metrics = _ppo_clip(
        lr, inputs.advantages_BT, inputs.mask_BT, eps_low=eps_low, eps_high=eps_high, dual_clip_c=None
    )
    metrics["gspo/seq_ratio_mean"] = masked_mean(s_ratio, inputs.mask_BT)
    return _agg(inputs, loss_BT, agg), {**metrics, **policy_metrics(inputs, log_ratio_BT=delta)}


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
    pos = masked_positions(inputs.mask_BT)
    lr, delta = _cumulative_log_ratio(
        inputs.logp_theta_BT, inputs.logp_old_BT, inputs.mask_BT, geomean=cum_mode is CumMode.GEOMEAN,
        clamp=LOG_RATIO_CLAMP, max_log=SG_LOG_RATIO_MAX, positions_BT=pos,
    )
    if cum_clip is CumClip.LA:
        loss_BT, rho, metrics = _ctpo_la(
            lr, inputs.advantages_BT, inputs.mask_BT, c_low=c_low, c_high=c_high, c_c=c_c, power=power,
            positions_BT=pos,
        )
    else:
        loss_BT, rho, metrics = _ppo_clip(
            lr, inputs.advantages_BT, inputs.mask_BT, eps_low=eps_low, eps_high=eps_high, dual_clip_c=dual_clip_c
        )
    metrics["ctpo/cum_ratio_mean"] = masked_mean(rho, inputs.mask_BT)
    return _agg(inputs, loss_BT, agg), {**metrics, **policy_metrics(inputs, log_ratio_BT=delta)}


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


# ----------------------------------------------------------------------------------------------
# GMPO (geo_mean) and LUSPO: one ratio per sequence, the loss spread over its tokens


def geo_mean(inputs: LossInputs, *, agg: str, eps_low: float, eps_high: float) -> tuple[Tensor, dict[str, Tensor]]:
    """GMPO (Zhao et al. 2025, arXiv 2507.20673; verl ``compute_policy_loss_geo_mean``).

    ``z_t = log r_t`` (clamped to +-20); per token, clipped in log space towards the advantage's sign:
    ``z~_t = sgn(A) min(sgn(A) z_t, sgn(A) clamp(z_t, -eps_low, eps_high))``; the geometric-mean ratio
    ``s_i = exp(mean_t z~_t)``; the sequence advantage ``A_i = mean_t A_t``; ``l_i = -A_i s_i`` on every token of
    row ``i``; the loss is the mean over sequences (``agg = seq-mean-token-mean``). Metrics
    ``pg/clipfrac`` (``z`` clamped and ``A > 0``) and ``pg/clipfrac_lower`` (clamped and ``A < 0``), as verl.
    """
    mask = inputs.mask_BT
    m = mask.to(inputs.logp_theta_BT.dtype)
    z = token_log_ratio(inputs.logp_theta_BT, inputs.logp_old_BT, mask)
    adv = inputs.advantages_BT
    sgn = torch.sign(adv)
    z_clamped = z.clamp(-eps_low, eps_high)
    z_tilde = sgn * torch.minimum(sgn * z, sgn * z_clamped)
    len_B = m.sum(-1)
    s_B = torch.exp((z_tilde * m).sum(-1) / len_B.clamp(min=1.0))
    adv_B = (adv * m).sum(-1) / len_B.clamp(min=1.0)
    loss_BT = torch.where(mask.bool(), (-adv_B * s_B)[:, None], 0.0)
    clipped = z.detach() != z_clamped.detach()
    metrics = masked_means({"pg/clipfrac": clipped & (adv > 0), "pg/clipfrac_lower": clipped & (adv < 0)}, mask,
                           dtype=z.dtype)
    metrics["gmpo/seq_ratio_mean"] = (s_B.detach() * (len_B > 0)).sum() / (len_B > 0).sum().clamp(min=1)
    return _agg(inputs, loss_BT, agg), {**metrics, **policy_metrics(inputs, log_ratio_BT=z)}


def luspo(inputs: LossInputs, *, agg: str, eps_low: float, eps_high: float) -> tuple[Tensor, dict[str, Tensor]]:
    """LUSPO (arXiv 2602.05261; TRL ``loss_type="luspo"`` with ``importance_sampling_level="sequence"``).

    ``s_i = exp(mean_t m log r_t)`` (differentiated through every token); per token
    ``l_t = -min(s_i A_t, clip(s_i, 1 - eps_low, 1 + eps_high) A_t)``; each sequence's loss scaled by its length:
    ``L = sum_i |y_i| l_i / N_seq`` (``agg = seq-mean-token-sum``), which removes GSPO's bias against long
    responses. Metric ``pg/clipfrac``: loss tokens whose sequence ratio is clipped on the side that binds.
    """
    mask = inputs.mask_BT
    m = mask.to(inputs.logp_theta_BT.dtype)
    z = token_log_ratio(inputs.logp_theta_BT, inputs.logp_old_BT, mask)
    s_B = torch.exp(((z * m).sum(-1) / m.sum(-1).clamp(min=1.0)).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    s = s_B[:, None]
    adv = inputs.advantages_BT
    unclipped, clipped = s * adv, torch.clamp(s, 1.0 - eps_low, 1.0 + eps_high) * adv
    loss_BT = torch.where(mask.bool(), -torch.minimum(unclipped, clipped), 0.0)
    metrics = masked_means({"pg/clipfrac": (clipped < unclipped).detach()}, mask, dtype=z.dtype)
    metrics["luspo/seq_ratio_mean"] = masked_mean(s.detach().expand_as(z), mask)
    return _agg(inputs, loss_BT, agg), {**metrics, **policy_metrics(inputs, log_ratio_BT=z)}


register(Preset(
    name="geo_mean",
    description="GMPO: the geometric mean of token ratios, clipped per token in log space to [-0.4, 0.4].",
    fn=geo_mean,
    defaults={"agg": "seq-mean-token-mean", "eps_low": 0.4, "eps_high": 0.4},
    advantage="grpo",
    source=("Zhao et al. 2025 (Geometric-Mean Policy Optimization, arXiv 2507.20673); verl core_algos.py "
            "compute_policy_loss_geo_mean, examples/gmpo_trainer (clip_ratio 0.4); callsys/GMPO"),
    equation=("z_t = log pi_theta/pi_old; z~_t = sgn(A) min(sgn(A) z_t, sgn(A) clamp(z_t, -eps_low, eps_high)); "
              "s_i = exp(mean_t z~_t); l_i = -mean_t(A) s_i; mean over sequences"),
))
register(Preset(
    name="luspo",
    description="LUSPO: GSPO's sequence-ratio clip with each sequence's loss scaled by its length (eps 2e-3/2.5e-3).",
    fn=luspo,
    defaults={"agg": "seq-mean-token-sum", "eps_low": 2e-3, "eps_high": 2.5e-3},
    advantage="grpo",
    source=("LUSPO (Length-Unbiased Sequence Policy Optimization, arXiv 2602.05261); TRL GRPOTrainer "
            "loss_type='luspo', importance_sampling_level='sequence'; TRL paper_index (epsilon 2e-3, epsilon_high "
            "2.5e-3, section 5.1)"),
    equation=("s_i = exp(mean_t m log r_t); l_t = -min(s_i A_t, clip(s_i, 1-eps_low, 1+eps_high) A_t); "
              "L = sum_i |y_i| l_i / N_seq"),
))
