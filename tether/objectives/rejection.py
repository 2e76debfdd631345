"""Presets of the rejection masks: PPO clip on ``r = pi_theta / pi_old`` with tokens or sequences dropped by a
test of the behaviour mismatch (the masks themselves are in ``rollout_correction`` / ``decoupled``).

- ``rejection``: ``divergence_rejection_mask`` (verl ``rollout_rs``): k1 / k2 / k3 of ``log(pi_old / mu)`` per
  token, aggregated per token or per sequence (sum / mean / max), compared with a threshold. Defaults: verl
  ``RolloutCorrectionConfig.bypass_ppo_clip_k3_rs`` (``seq_mean_k3``, threshold 0.01).
- ``opsm``: ``opsm_mask`` (DeepSeek-V3.2 off-policy sequence masking; TRL ``get_off_policy_mask``, slime
  ``compute_opsm_mask``): a negative-advantage sequence whose mean ``log mu - log pi_theta`` exceeds ``delta``
  is dropped. Default ``delta = 1e-4`` (slime ``--opsm-delta``).
- ``roll_infer``: ``roll_infer_correction`` (ROLL ``InferCorrectionHandler``): truncated IS weight, then token /
  catastrophic / sequence rejection, in ROLL's order with ROLL's defaults.

Every mask and weight is detached and per row (no whole-batch statistic), so micro-batching is exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from tether.objectives.decoupled import roll_infer_correction
from tether.objectives.inputs import LossInputs, float_mask
from tether.objectives.registry import Preset, register
from tether.objectives.rollout_correction import (
    _PPO_DEFAULTS,
    _require_mu,
    divergence_rejection_mask,
    dropped_fraction,
    opsm_mask,
    weighted_ppo,
)


def rejection(inputs: LossInputs, *, agg: str, eps_low: float, eps_high: float, dual_clip_c: float | None,
              estimator: str, level: str, high: float, low: float | None) -> tuple[Tensor, dict[str, Tensor]]:
    """``l_t = keep_t * l^PPO_t`` with ``keep = divergence_rejection_mask(pi_old, mu; estimator, level, high, low)``.

    ``level`` is the mask's aggregation (``token``, ``seq-sum``, ``seq-mean``, ``seq-max``). Metric
    ``rejection/maskfrac``: the fraction of loss tokens dropped."""
    mu = _require_mu(inputs, "rejection")
    keep = divergence_rejection_mask(inputs.logp_old_BT, mu, inputs.mask_BT, estimator=estimator, agg=level,
                                     high=high, low=low)
    loss, pg = weighted_ppo(inputs, float_mask(keep, inputs.logp_theta_BT.dtype), agg, eps_low, eps_high, dual_clip_c)
    return loss, {**pg, "rejection/maskfrac": dropped_fraction(keep, inputs.mask_BT).to(loss.dtype)}


def opsm(inputs: LossInputs, *, agg: str, eps_low: float, eps_high: float, dual_clip_c: float | None,
         delta: float) -> tuple[Tensor, dict[str, Tensor]]:
    """``l_t = keep_t * l^PPO_t`` with ``keep = opsm_mask(pi_theta, mu, A; delta)``: drop the tokens of a sequence
    with ``A < 0`` and ``mean_t (log mu - sg(log pi_theta)) > delta``. Metric ``opsm/maskfrac``."""
    mu = _require_mu(inputs, "opsm")
    keep = opsm_mask(inputs.logp_theta_BT, mu, inputs.advantages_BT, inputs.mask_BT, delta=delta)
    loss, pg = weighted_ppo(inputs, float_mask(keep, inputs.logp_theta_BT.dtype), agg, eps_low, eps_high, dual_clip_c)
    return loss, {**pg, "opsm/maskfrac": dropped_fraction(keep, inputs.mask_BT).to(loss.dtype)}


def _pair(value: Sequence[float] | None, name: str) -> tuple[float, float] | None:
    """A ``(low, high)`` bound from a list or tuple (JSON gives lists); None stays None."""
    if value is None:
        return None
    if len(value) != 2:
        raise ValueError(f"roll_infer: {name} must be [low, high], got {value!r}")
    return float(value[0]), float(value[1])


def roll_infer(inputs: LossInputs, *, agg: str, eps_low: float, eps_high: float, dual_clip_c: float | None,
               is_level: str | None, is_min: float, is_max: float, token_reject: Sequence[float] | None,
               catastrophic: float | None, seq_reject: str | None,
               seq_bounds: Sequence[float]) -> tuple[Tensor, dict[str, Tensor]]:
    """``l_t = keep_t * w_t * l^PPO_t`` with ``(w, keep) = roll_infer_correction(pi_old, mu; ...)`` (ROLL's order:
    IS weight, token reject, catastrophic reject, sequence reject). Metrics ``infer/*``."""
    mu = _require_mu(inputs, "roll_infer")
    bounds = _pair(seq_bounds, "seq_bounds")
    assert bounds is not None
    w, keep, metrics = roll_infer_correction(
        inputs.logp_old_BT, mu, inputs.mask_BT, is_level=is_level, is_min=is_min, is_max=is_max,
        token_reject=_pair(token_reject, "token_reject"), catastrophic=catastrophic, seq_reject=seq_reject,
        seq_bounds=bounds)
    weight = torch.where(keep, w, torch.zeros_like(w))
    loss, pg = weighted_ppo(inputs, weight, agg, eps_low, eps_high, dual_clip_c)
    return loss, {**pg, **metrics}


_PPO_TIGHTEN = {"eps_low": "scale", "eps_high": "scale"}

register(Preset(
    name="rejection",
    description="PPO clip with tokens / sequences rejected by a k1/k2/k3 divergence of pi_old/mu (k3 seq-mean <= 0.01).",
    fn=rejection,
    defaults={**_PPO_DEFAULTS, "estimator": "k3", "level": "seq-mean", "high": 0.01, "low": None},
    advantage="grpo",
    source=("verl rollout_corr_helper rollout_rs (token_k1 .. seq_max_k3); defaults: verl "
            "RolloutCorrectionConfig.bypass_ppo_clip_k3_rs (seq_mean_k3, 0.01)"),
    requires=("logp_mu_BT",),
    equation=("delta_t = log pi_old - log mu; k1 = delta, k2 = delta^2/2, k3 = e^delta - 1 - delta; stat = k per "
              "token | seq sum | seq mean | seq max; keep: k1 log low <= stat <= log high (low = 1/high), k2/k3 "
              "stat <= high; l_t = keep_t * l^PPO_t"),
    tighten=_PPO_TIGHTEN,
))
register(Preset(
    name="opsm",
    description="PPO clip with off-policy sequence masking: negative-advantage sequences far from mu dropped.",
    fn=opsm,
    defaults={**_PPO_DEFAULTS, "delta": 1e-4},
    advantage="grpo",
    source="DeepSeek-AI 2025 (DeepSeek-V3.2, OPSM); TRL get_off_policy_mask; slime compute_opsm_mask (--opsm-delta 1e-4)",
    requires=("logp_mu_BT",),
    equation=("kl_i = mean_t (log mu - sg(log pi_theta)); keep_{i,t} = not (A_{i,t} < 0 and kl_i > delta); "
              "l_t = keep_t * l^PPO_t"),
    tighten=_PPO_TIGHTEN,
))
register(Preset(
    name="roll_infer",
    description="PPO clip times ROLL's train-inference correction: TIS weight [0, 2], catastrophic 1e-4 veto, "
                "optional token / sequence rejection.",
    fn=roll_infer,
    defaults={**_PPO_DEFAULTS, "is_level": "token", "is_min": 0.0, "is_max": 2.0, "token_reject": None,
              "catastrophic": 1e-4, "seq_reject": None, "seq_bounds": (0.1, 10.0)},
    advantage="grpo",
    source="ROLL InferCorrectionHandler (infer_is_mode, infer_token_mask, catastrophic reject, infer_seq_mask)",
    requires=("logp_mu_BT",),
    equation=("w = clamp(pi_old/mu, is_min, is_max) (token or sequence); keep = token band (token_reject) and no "
              "token ratio < catastrophic and sequence ratio in seq_bounds (seq_reject); l_t = keep_t w_t l^PPO_t"),
    tighten={**_PPO_TIGHTEN, "is_max": "upper"},
))
