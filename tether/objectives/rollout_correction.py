"""Rollout (train/inference) correction between pi_old and the behaviour policy mu.

Notation (methods.md §0): ``delta_t = m_t * clamp(log pi_old(y_t) - log mu(y_t), -20, 20)`` is the
behaviour log-ratio, ``rho_t = exp(delta_t)`` the token ratio, ``sum_t m_t delta_t`` the log of the
sequence (product) ratio and ``(1/|y|) sum_t m_t delta_t`` the log of the geometric-mean ratio.
``pi_old`` and ``mu`` carry no gradient, so every weight and mask here is detached: it multiplies
the per-token policy loss and rescales its gradient, it never adds a gradient path of its own.

Building blocks (pure functions, ``[B, T]`` in, ``[B, T]`` out; masks are ``bool`` with ``False`` on
padding, weights are ``0`` on padding):

- ``truncated_is_weights``: TIS, token or sequence level (verl ``rollout_corr_helper``, slime
  ``vanilla_tis_function``, ROLL ``infer_is_mode``).
- ``icepop_mask`` / ``icepop_weights``: IcePop two-sided token mask (Ling team, Ring-1T report;
  slime ``icepop_function``; verl ``rollout_is_threshold="lower_upper"``).
- ``sequence_ratio_mask``: product-ratio or geometric-mean-ratio sequence mask (ROLL, verl Geo-RS).
- ``divergence_rejection_mask``: rejection by k1/k2/k3 of ``log(pi_old/mu)`` with token / seq-sum /
  seq-mean / seq-max aggregation (verl ``rollout_rs`` options; verl's k1 is the mirror,
  ``log(mu/pi_old)``: see the function).
- ``catastrophic_veto_mask``: drop a sequence if any token ratio is below a threshold (ROLL, slime
  ``rs_veto_threshold``, older verl ``rollout_token_veto_threshold``).
- ``self_normalised_weights``: batch-normalised IS, weights divided by their batch mean (verl
  ``rollout_is_batch_normalize``, slime ``tis_batch_normalize``).
- ``opsm_mask``: DeepSeek-V3.2 off-policy sequence masking (TRL ``get_off_policy_mask``, slime
  ``compute_opsm_mask``).
- ``sequence_log_bounds``: per-row bounds of a sequence cap or band meant at a reference length
  (``length_calibration``: ``geo`` / ``sqrt``), read by ``truncated_is_weights``, ``masked_is_weights`` and
  ``icepop_weights`` at sequence level (docs/objectives_notes/length_calibration.md).

Presets: ``tis``, ``icepop``, ``mis`` (PPO clip on ``r = pi_theta / pi_old`` times a detached
correction of ``pi_old / mu``). Masked tokens contribute zero to the loss; the aggregation
denominators are the caller's (the original loss mask or the global counts), as in TRL / slime /
AReaL. See docs/objectives_notes/corrections.md for the choices and deviations from peers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from tether.objectives.aggregation import aggregate, parse_choice
from tether.objectives.inputs import LossInputs, float_mask, indicator, masked_means, max_or_zero
from tether.objectives.length_calibration import (
    LengthCalibration,
    bound_range_metrics,
    calibrated_log_bound,
    check_length_calibration,
)
from tether.objectives.policy_gradient import _ppo_clip, policy_metrics
from tether.objectives.ratios import LOG_RATIO_CLAMP, geometric_log_ratio, sequence_log_ratio, token_log_ratio
from tether.objectives.registry import Preset, register

CATASTROPHIC_RATIO = 1e-4
"""Token ratio below which a whole sequence is vetoed (ROLL, slime ``rs_veto_threshold``)."""


class ISLevel(str, Enum):
    TOKEN = "token"
    SEQUENCE = "sequence"
    GEOMETRIC = "geometric"

    @classmethod
    def parse(cls, value: str | ISLevel, *, field: str = "level") -> ISLevel:
        return parse_choice(cls, value, field)


class Divergence(str, Enum):
    K1 = "k1"
    K2 = "k2"
    K3 = "k3"


class DivergenceAgg(str, Enum):
    TOKEN = "token"
    SEQ_SUM = "seq-sum"
    SEQ_MEAN = "seq-mean"
    SEQ_MAX = "seq-max"


def _parse(enum: type[Enum], value: object, field: str) -> Enum:
    try:
        return enum(value)
    except ValueError:
        valid = ", ".join(m.value for m in enum)
        raise ValueError(f"unknown {field} '{value}'; valid: {valid}") from None


def log_bound(x: float) -> float:
    """``log x`` with ``log 0 = -inf`` and ``log inf = inf`` (bounds are compared in log space)."""
    if x < 0 or math.isnan(x):
        raise ValueError(f"ratio bound must be >= 0, got {x}")
    if x == 0:
        return -math.inf
    return math.log(x)


def sequence_log_bounds(
    mask_BT: Tensor,
    low: float,
    high: float,
    *,
    length_calibration: LengthCalibration,
    ref_len: float | None,
    length_drift: float,
    prefix: str,
    names: tuple[str, str] = ("low", "high"),
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Per-row log bounds ``(log low(T_i), log high(T_i))`` of a length-calibrated sequence band, ``[B]``
    float64, and their range metrics ``{prefix}/calib_log_{name}_min|max`` for each finite bound
    (``length_calibration.calibrated_log_bound`` at ``T_i = sum_t m_t``)."""
    len_B = mask_BT.detach().to(torch.float64).sum(-1)
    kw = {"length_calibration": length_calibration, "ref_len": ref_len, "length_drift": length_drift}
    metrics: dict[str, Tensor] = {}
    out = []
    for bound, name in zip((low, high), names):
        log_b = log_bound(bound)
        b_B = calibrated_log_bound(log_b, len_B, **kw)
        if math.isfinite(log_b):
            metrics.update(bound_range_metrics(b_B, len_B > 0, f"{prefix}/calib_log_{name}"))
        out.append(b_B)
    return out[0], out[1], metrics


# ----------------------------------------------------------------------------------------------
# Log-ratios and metrics


def behaviour_log_ratio(
    logp_old_BT: Tensor, logp_mu_BT: Tensor, mask_BT: Tensor, *, clamp: float = LOG_RATIO_CLAMP
) -> Tensor:
    """Detached ``delta_t = m_t * clamp(log pi_old - log mu, -clamp, clamp)`` (0 on padding)."""
    return token_log_ratio(logp_old_BT.detach(), logp_mu_BT.detach(), mask_BT, clamp=clamp)


def level_log_ratio(delta_BT: Tensor, mask_BT: Tensor, level: str | ISLevel) -> Tensor:
    """The log-ratio at a level, broadcast to ``[B, T]``: token ``delta_t``; sequence
    ``clamp(sum_t m delta, -20, 20)``; geometric ``(1/|y|) sum_t m delta`` (0 on padding)."""
    level = ISLevel.parse(level)
    if level is ISLevel.TOKEN:
        out = delta_BT
    elif level is ISLevel.SEQUENCE:
        out = sequence_log_ratio(delta_BT, mask_BT).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)[:, None]
    else:
        out = geometric_log_ratio(delta_BT, mask_BT)[:, None]
    out = out.expand_as(delta_BT)
    return torch.where(mask_BT.bool(), out, torch.zeros_like(delta_BT))


def weight_metrics(w_BT: Tensor, mask_BT: Tensor, prefix: str) -> dict[str, Tensor]:
    """``{prefix}/weight_mean|std|max`` over loss tokens (population std; 0 when no loss token)."""
    with torch.no_grad():
        w = w_BT.detach()
        m = float_mask(mask_BT.bool(), w.dtype)
        n = m.sum()
        mean = _dot(w, m) / n.clamp(min=1.0)
        dev = (w - mean) * m
        var = _dot(dev, dev) / n.clamp(min=1.0)
        # (m - 1) * max is 0 on loss tokens and -max on padding: the plain max is the max over loss tokens
        wmax = torch.where(n > 0, max_or_zero(w + (m - 1.0) * torch.finfo(w.dtype).max), 0.0)
    return {f"{prefix}/weight_mean": mean, f"{prefix}/weight_std": var.sqrt(), f"{prefix}/weight_max": wmax}


def _weight_and_mismatch_metrics(
    w_BT: Tensor, delta_BT: Tensor, valid_BT: Tensor, prefix: str, kl_prefix: str = "mismatch"
) -> dict[str, Tensor]:
    """``weight_metrics(w) | mismatch_metrics(delta)`` in one pass (one mask, one count, one division)
    for a correction weight that is ``>= 0`` and ``0`` on padding, as every weight built here is: then
    the max over loss tokens is the plain max (0 when there is none)."""
    with torch.no_grad():
        w, d = w_BT.detach(), delta_BT.detach()
        m = float_mask(valid_BT, w.dtype)
        n = m.sum().clamp(min=1.0)
        mean = _dot(w, m) / n
        dev = (w - mean).mul_(m)
        sums = torch.stack([_dot(dev, dev), _dot(d, m), _dot(torch.expm1(d).sub_(d), m)]) / n
        return {
            f"{prefix}/weight_mean": mean,
            f"{prefix}/weight_std": sums[0].sqrt(),
            f"{prefix}/weight_max": max_or_zero(w),
            f"{kl_prefix}/kl_k1": -sums[1],
            f"{kl_prefix}/kl_k3": sums[2],
        }


def _dot(a_BT: Tensor, b_BT: Tensor) -> Tensor:
    return torch.dot(a_BT.reshape(-1), b_BT.reshape(-1))


def dropped_fraction(keep_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Fraction of loss tokens a keep-mask removes (0 when there is no loss token), float64."""
    return masked_means({"": ~keep_BT.bool()}, mask_BT, dtype=torch.float64)[""]


def mismatch_metrics(delta_BT: Tensor, mask_BT: Tensor, prefix: str = "mismatch") -> dict[str, Tensor]:
    """Train-inference KL(mu || pi_old) estimates on the sampled tokens (ROLL ``inferkl``):
    ``k1 = mean(-delta)``, ``k3 = mean(exp(delta) - 1 - delta)``."""
    with torch.no_grad():
        d = delta_BT.detach()
        m = float_mask(mask_BT.bool(), d.dtype)
        sums = torch.stack([_dot(d, m), _dot(torch.expm1(d) - d, m)]) / m.sum().clamp(min=1.0)
    return {f"{prefix}/kl_k1": -sums[0], f"{prefix}/kl_k3": sums[1]}


# ----------------------------------------------------------------------------------------------
# Weights


def truncated_is_weights(
    logp_old_BT: Tensor,
    logp_mu_BT: Tensor,
    mask_BT: Tensor,
    *,
    level: str | ISLevel = ISLevel.TOKEN,
    cap: float = 2.0,
    floor: float = 0.0,
    prefix: str = "tis",
    length_calibration: str | LengthCalibration = LengthCalibration.NONE,
    ref_len: float | None = None,
    length_drift: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Truncated importance-sampling weights of ``pi_old / mu`` (TIS), detached.

    token:     ``w_t = clamp(exp(delta_t), floor, cap)``
    sequence:  ``w = clamp(exp(clamp(sum_t m_t delta_t, -20, 20)), floor, cap)`` on every token
    geometric: ``w = clamp(exp((1/|y|) sum_t m_t delta_t), floor, cap)`` on every token
    (methods.md §0; verl ``compute_rollout_correction_weights``; slime ``--tis-clip`` /
    ``--tis-clip-low``; ROLL ``infer_is_mode`` with ``[tau_min, tau_max]``). ``cap = inf`` gives
    plain IS. Weights are 0 on padding.
    Metrics: weight mean/std/max and ``clipfrac_high`` / ``clipfrac_low`` (loss-token fractions
    whose raw weight was above ``cap`` / below ``floor``).
    Length calibration (``level="sequence"`` only; ``length_calibration`` module): the bounds are meant at
    length ``ref_len`` and move to each row's length, ``w_i = exp(clamp(log s_i, log floor(T_i), log cap(T_i)))``
    with ``log s_i`` the +-20-clamped sum; extra metrics ``calib_log_cap_min|max`` (and ``calib_log_floor_*``
    for ``floor > 0``), the range of the per-row log cap.
    """
    if not cap >= floor:
        raise ValueError(f"truncated_is_weights: cap ({cap}) must be >= floor ({floor})")
    level = ISLevel.parse(level)
    cal = check_length_calibration(length_calibration, ref_len, length_drift, level=level.value)
    delta = behaviour_log_ratio(logp_old_BT, logp_mu_BT, mask_BT)
    valid = mask_BT.bool()
    if cal is LengthCalibration.NONE:
        # delta is already 0 on padding, which is what level_log_ratio returns at token level
        log_w = delta if level is ISLevel.TOKEN else level_log_ratio(delta, mask_BT, level)
        # exp of a log-ratio clamped to +-20 is finite, so multiplying by the 0/1 mask zeroes padding exactly
        w = torch.exp(log_w).clamp(min=floor, max=cap) * float_mask(valid, log_w.dtype)
        # an infinite bound (cap = inf, floor = 0) clips nothing: its fraction is 0 without a pass over the tokens
        zero = torch.zeros((), dtype=w.dtype, device=w.device)
        flags = {f"{prefix}/clipfrac_high": zero, f"{prefix}/clipfrac_low": zero.clone()}
        bounded = {}
        if cap < math.inf:
            bounded[f"{prefix}/clipfrac_high"] = indicator(torch.gt, log_w, log_bound(cap))
        if floor > 0:
            bounded[f"{prefix}/clipfrac_low"] = indicator(torch.lt, log_w, log_bound(floor))
        flags.update(masked_means(bounded, valid, dtype=w.dtype))
    else:
        w, flags = _calibrated_sequence_tis(delta, valid, cap, floor, cal, ref_len, length_drift, prefix)
    wm = _weight_and_mismatch_metrics(w, delta, valid, prefix)
    metrics = {k: wm[k] for k in (f"{prefix}/weight_mean", f"{prefix}/weight_std", f"{prefix}/weight_max")}
    metrics.update(flags)
    metrics.update({k: wm[k] for k in ("mismatch/kl_k1", "mismatch/kl_k3")})
    return w, metrics


def _calibrated_sequence_tis(
    delta_BT: Tensor, valid_BT: Tensor, cap: float, floor: float, cal: LengthCalibration, ref_len: float | None,
    length_drift: float, prefix: str,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Sequence TIS with per-row bounds, decided on ``[B]`` rows and broadcast once:
    ``w_i = exp(clamp(clamp(S_i, +-20), log floor(T_i), log cap(T_i)))``; the clip fractions are
    ``sum_i T_i 1[S_i > log cap(T_i)] / N`` (and ``< log floor``), plus the bound range metrics."""
    m = float_mask(valid_BT, delta_BT.dtype)
    dt = delta_BT.dtype
    lo_B, hi_B, metrics = sequence_log_bounds(m, floor, cap, length_calibration=cal, ref_len=ref_len,
                                              length_drift=length_drift, prefix=prefix, names=("floor", "cap"))
    log_s_B = sequence_log_ratio(delta_BT, m).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    lo_B, hi_B = lo_B.to(dt), hi_B.to(dt)
    w = torch.exp(torch.clamp(log_s_B, min=lo_B, max=hi_B))[:, None] * m
    len_B = m.sum(-1)
    n = len_B.sum().clamp(min=1.0)
    zero = torch.zeros((), dtype=dt, device=delta_BT.device)
    metrics = {k: v.to(dt) for k, v in metrics.items()}
    metrics[f"{prefix}/clipfrac_high"] = _dot1(len_B, log_s_B > hi_B) / n if cap < math.inf else zero
    metrics[f"{prefix}/clipfrac_low"] = _dot1(len_B, log_s_B < lo_B) / n if floor > 0 else zero.clone()
    return w, metrics


def _dot1(len_B: Tensor, flag_B: Tensor) -> Tensor:
    """``sum_i len_i 1[flag_i]``."""
    return torch.dot(len_B, flag_B.to(len_B.dtype))


def self_normalised_weights(
    w_BT: Tensor, mask_BT: Tensor, *, level: str | ISLevel = ISLevel.TOKEN
) -> tuple[Tensor, Tensor]:
    """Self-normalised (batch-normalised) IS: ``w~ = w / mean(w)``, detached; returns ``(w~, mean)``.

    token level: the mean is over loss tokens, ``sum_{i,t} m w / sum m``;
    sequence / geometric level: the mean is over sequences with at least one loss token of their
    (broadcast) weight, ``sum_i w_i / N_seq`` (verl ``rollout_is_batch_normalize``; slime
    ``tis_batch_normalize``). If the mean is 0 (nothing valid, or every weight 0) the weights are
    returned unchanged. The mean is local to the tensors given: micro-batches normalise
    separately (pass the whole batch to normalise globally).
    """
    level = ISLevel.parse(level)
    w = w_BT.detach()
    m = mask_BT.to(w.dtype)
    if level is ISLevel.TOKEN:
        mean = (w * m).sum() / m.sum().clamp(min=1.0)
    else:
        has = m.sum(-1) > 0
        # every loss token of a row carries the same weight: read it back as the row's token mean
        w_B = (w * m).sum(-1) / m.sum(-1).clamp(min=1.0)
        mean = torch.where(has, w_B, torch.zeros_like(w_B)).sum() / has.to(w.dtype).sum().clamp(min=1.0)
    safe = torch.where(mean > 0, mean, torch.ones_like(mean))
    return w / safe, mean


# ----------------------------------------------------------------------------------------------
# Masks (True = keep)


def icepop_mask(
    logp_old_BT: Tensor, logp_mu_BT: Tensor, mask_BT: Tensor, *, low: float = 0.5, high: float = 5.0
) -> Tensor:
    """IcePop two-sided token mask: keep ``t`` iff ``low <= rho_t <= high`` (and ``m_t = 1``).

    ``rho_t = pi_old(y_t) / mu(y_t)``. Defaults ``[0.5, 5]`` are the IcePop values (Ling team,
    "Every Step Evolves" / Ring-1T, 2025; AReaL ``upper`` default 5). verl reads ``"0.5_5.0"`` two
    ways: as ``rollout_is_threshold`` (IcePop weights on ``pi_old/mu``) it is this band; as a
    ``rollout_rs="token_k1"`` threshold it bounds ``log(mu/pi_old)``, i.e. keeps ``pi_old/mu`` in
    ``[0.2, 2]`` (see ``divergence_rejection_mask``).
    Compared in log space, so ratios of ``exp(+-50)`` do not overflow.
    """
    if not high >= low:
        raise ValueError(f"icepop_mask: high ({high}) must be >= low ({low})")
    delta = behaviour_log_ratio(logp_old_BT, logp_mu_BT, mask_BT)
    return _band_keep(delta, mask_BT.bool(), low, high)


def _band_keep(delta_BT: Tensor, valid_BT: Tensor, low: float, high: float) -> Tensor:
    """``m_t 1[log low <= delta_t <= log high]``."""
    return (delta_BT >= log_bound(low)) & (delta_BT <= log_bound(high)) & valid_BT


def icepop_weights(
    logp_old_BT: Tensor,
    logp_mu_BT: Tensor,
    mask_BT: Tensor,
    *,
    low: float = 0.5,
    high: float = 5.0,
    prefix: str = "icepop",
    level: str | ISLevel = ISLevel.TOKEN,
    length_calibration: str | LengthCalibration = LengthCalibration.NONE,
    ref_len: float | None = None,
    length_drift: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """IcePop weights ``w_t = rho_t * 1[low <= rho_t <= high]``, detached (0 on padding).

    This is IcePop's ``M(rho) = rho`` inside the band and ``0`` outside (slime ``icepop_function``,
    verl ``"lower_upper"`` rollout_is threshold): the in-band tokens keep their IS correction.
    ``level="sequence"`` / ``"geometric"``: the same rule on the sequence ratio ``exp(sum_t m delta_t)`` (band
    test unclamped, weight from the +-20-clamped sum) or its geometric mean, broadcast over the row (verl
    ``rollout_is`` at sequence level with a ``lower_upper`` threshold). At sequence level the band can be
    length-calibrated (``length_calibration`` module): ``[low(T_i), high(T_i)]`` per row, with metrics
    ``calib_log_low|high_min|max``.
    Metrics: weight stats, ``maskfrac_low`` / ``maskfrac_high`` (loss tokens below / above the band).
    """
    if not high >= low:
        raise ValueError(f"icepop_mask: high ({high}) must be >= low ({low})")
    level = ISLevel.parse(level)
    cal = check_length_calibration(length_calibration, ref_len, length_drift, level=level.value)
    valid = mask_BT.bool()
    delta = behaviour_log_ratio(logp_old_BT, logp_mu_BT, mask_BT)
    if level is ISLevel.TOKEN:
        below = indicator(torch.lt, delta, log_bound(low))
        above = indicator(torch.gt, delta, log_bound(high))
        # keep = m (1 - below) (1 - above); exp(delta) is finite (|delta| <= 20), so the 0/1 products
        # zero the dropped tokens and the padding exactly
        w = torch.exp(delta).mul_(1.0 - below).mul_(1.0 - above).mul_(float_mask(valid, delta.dtype))
        flags = masked_means({f"{prefix}/maskfrac_low": below, f"{prefix}/maskfrac_high": above}, valid,
                             dtype=w.dtype)
    else:
        w, flags = _sequence_icepop(delta, valid, low, high, level, cal, ref_len, length_drift, prefix)
    wm = _weight_and_mismatch_metrics(w, delta, valid, prefix)
    metrics = {k: wm[k] for k in (f"{prefix}/weight_mean", f"{prefix}/weight_std", f"{prefix}/weight_max")}
    metrics.update(flags)
    metrics.update({k: wm[k] for k in ("mismatch/kl_k1", "mismatch/kl_k3")})
    return w, metrics


def _sequence_icepop(
    delta_BT: Tensor, valid_BT: Tensor, low: float, high: float, level: ISLevel, cal: LengthCalibration,
    ref_len: float | None, length_drift: float, prefix: str,
) -> tuple[Tensor, dict[str, Tensor]]:
    """IcePop on the row ratio, decided on ``[B]`` rows and broadcast once: ``x_i`` = the unclamped sum
    (sequence) or mean (geometric) of ``delta``; ``w_i = exp(x_i) 1[log low(T_i) <= x_i <= log high(T_i)]``
    (the sum clamped to +-20 inside ``exp``); ``maskfrac_low|high = sum_i T_i 1[x_i < lo | > hi] / N``, plus
    the bound range metrics when calibrated."""
    dt = delta_BT.dtype
    m = float_mask(valid_BT, dt)
    if level is ISLevel.GEOMETRIC:
        x_B = geometric_log_ratio(delta_BT, m)
        log_w_B = x_B
    else:
        x_B = sequence_log_ratio(delta_BT, m)
        log_w_B = x_B.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    metrics: dict[str, Tensor] = {}
    lo: float | Tensor = log_bound(low)
    hi: float | Tensor = log_bound(high)
    if cal is not LengthCalibration.NONE:
        lo_B, hi_B, calib = sequence_log_bounds(m, low, high, length_calibration=cal, ref_len=ref_len,
                                                length_drift=length_drift, prefix=prefix)
        lo, hi = lo_B.to(dt), hi_B.to(dt)
        metrics.update({k: v.to(dt) for k, v in calib.items()})
    below_B, above_B = x_B < lo, x_B > hi
    w = torch.where(below_B | above_B, 0.0, torch.exp(log_w_B))[:, None] * m
    len_B = m.sum(-1)
    n = len_B.sum().clamp(min=1.0)
    metrics[f"{prefix}/maskfrac_low"] = _dot1(len_B, below_B) / n
    metrics[f"{prefix}/maskfrac_high"] = _dot1(len_B, above_B) / n
    return w, metrics


def sequence_ratio_mask(
    logp_old_BT: Tensor,
    logp_mu_BT: Tensor,
    mask_BT: Tensor,
    *,
    low: float,
    high: float,
    geometric: bool = False,
) -> Tensor:
    """Drop whole sequences whose ratio is outside ``[low, high]``; keep-mask broadcast to ``[B, T]``.

    product:   ``s_i = exp(sum_t m delta_t)``  (ROLL ``sequence``; TRL ``sequence_mask``)
    geometric: ``s_i = exp((1/|y_i|) sum_t m delta_t)``  (ROLL ``geometric``; verl Geo-RS
    ``seq_mean_k1``). Compared in log space without the +-20 clamp on the sum (a sum beyond the
    clamp is outside any finite band anyway). Rows without loss tokens have ``s = 1``.
    """
    if not high >= low:
        raise ValueError(f"sequence_ratio_mask: high ({high}) must be >= low ({low})")
    delta = behaviour_log_ratio(logp_old_BT, logp_mu_BT, mask_BT)
    return _sequence_keep_B(delta, mask_BT, low, high, geometric)[:, None] & mask_BT.bool()


def _sequence_keep_B(delta_BT: Tensor, mask_BT: Tensor, low: float, high: float, geometric: bool) -> Tensor:
    """Per row: ``log low <= log s_i <= log high`` (product or geometric-mean sequence ratio), ``[B]``."""
    log_s = geometric_log_ratio(delta_BT, mask_BT) if geometric else sequence_log_ratio(delta_BT, mask_BT)
    return (log_s >= log_bound(low)) & (log_s <= log_bound(high))


def divergence_rejection_mask(
    logp_old_BT: Tensor,
    logp_mu_BT: Tensor,
    mask_BT: Tensor,
    *,
    estimator: str | Divergence,
    agg: str | DivergenceAgg,
    high: float,
    low: float | None = None,
) -> Tensor:
    """Rejection by a divergence estimator of ``log(pi_old / mu)`` (verl ``rollout_rs``).

    Per token, with ``delta_t`` the clamped behaviour log-ratio:
      k1: ``delta_t`` (a log-ratio; bounds are *ratio* bounds ``[low, high]`` on ``pi_old/mu``,
          ``low`` defaults to ``1/high`` as in verl). verl's ``*_k1`` statistic is the mirror,
          ``-delta_t = log(mu/pi_old)`` (``token_k1 = -log_ratio``), so its threshold
          ``"lower_upper"`` is tether's ``[1/upper, 1/lower]``: verl ``"0.5_5.0"`` = tether
          ``[0.2, 2]``. The two agree for reciprocal bands (``low = 1/high``, both defaults);
      k2: ``0.5 * delta_t^2``;  k3: ``exp(delta_t) - 1 - delta_t`` (>= 0, E_mu[k3] = KL(mu||pi_old));
          for k2/k3 only the upper bound ``high`` is used.
    Aggregation: ``token`` (each token on its own), ``seq-sum`` / ``seq-mean`` / ``seq-max`` of
    the per-token values over loss tokens (``seq-max`` only for k2/k3, as in verl). Sequence
    criteria drop the whole sequence. k1: keep iff ``log low <= stat <= log high``;
    k2/k3: keep iff ``stat <= high``. Returns the keep-mask ``[B, T]``.
    """
    est = _parse(Divergence, estimator, "divergence estimator")
    how = _parse(DivergenceAgg, agg, "divergence aggregation")
    if est is Divergence.K1 and how is DivergenceAgg.SEQ_MAX:
        raise ValueError("divergence_rejection_mask: seq-max is defined for k2/k3 only (as in verl)")
    delta = behaviour_log_ratio(logp_old_BT, logp_mu_BT, mask_BT)
    valid = mask_BT.bool()
    if est is Divergence.K1:
        per_tok = delta
    elif est is Divergence.K2:
        per_tok = 0.5 * delta**2
    else:
        per_tok = torch.expm1(delta) - delta
    per_tok = torch.where(valid, per_tok, torch.zeros_like(per_tok))
    m = mask_BT.to(per_tok.dtype)
    if how is DivergenceAgg.TOKEN:
        stat = per_tok
    elif how is DivergenceAgg.SEQ_SUM:
        stat = per_tok.sum(-1, keepdim=True)
    elif how is DivergenceAgg.SEQ_MEAN:
        stat = per_tok.sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
    else:  # k2/k3 are >= 0 and padding is 0, so the row max over loss tokens is the plain row max
        stat = per_tok.max(-1, keepdim=True).values
    if est is Divergence.K1:
        lo = 1.0 / high if low is None else low
        if not high >= lo:
            raise ValueError(f"divergence_rejection_mask: high ({high}) must be >= low ({lo})")
        keep = (stat >= log_bound(lo)) & (stat <= log_bound(high))
    else:
        keep = stat <= high
    return keep.expand_as(delta) & valid


def catastrophic_veto_mask(
    logp_old_BT: Tensor, logp_mu_BT: Tensor, mask_BT: Tensor, *, threshold: float = CATASTROPHIC_RATIO
) -> Tensor:
    """Catastrophic-token veto: drop a sequence if any loss token has ``rho_t < threshold``.

    ROLL (catastrophic reject, 1e-4), slime ``rs_veto_threshold`` (1e-4), older verl
    ``rollout_token_veto_threshold``. Returns the keep-mask ``[B, T]``.
    """
    delta = behaviour_log_ratio(logp_old_BT, logp_mu_BT, mask_BT)
    return _veto_keep_B(delta, mask_BT.bool(), threshold)[:, None] & mask_BT.bool()


def _veto_keep_B(delta_BT: Tensor, valid_BT: Tensor, threshold: float) -> Tensor:
    """Per row: no loss token has ``delta_t < log threshold``, ``[B]``."""
    log_thr = log_bound(threshold)
    if log_thr <= 0.0 and delta_BT.shape[-1] > 0:
        # delta is 0 on padding and 0 >= log_thr, so the row minimum decides (one reduction, no mask)
        return ~(delta_BT.amin(-1) < log_thr)
    return ~((delta_BT < log_thr) & valid_BT).any(-1)


def opsm_mask(
    logp_theta_BT: Tensor,
    logp_mu_BT: Tensor,
    advantages_BT: Tensor,
    mask_BT: Tensor,
    *,
    delta: float = 1e-4,
) -> Tensor:
    """Off-policy sequence masking (OPSM, DeepSeek-V3.2).

    ``kl_i = sum_t m_t (log mu(y_t) - sg(log pi_theta(y_t))) / max(sum_t m_t, 1)`` (the sequence-mean
    k1 estimate of KL(mu || pi_theta) on mu's samples); token ``t`` of row ``i`` is dropped iff
    ``A_{i,t} < 0`` and ``kl_i > delta``. With sequence advantages broadcast over tokens this is
    TRL ``get_off_policy_mask`` (keep iff ``A >= 0`` or ``kl <= delta``) and slime
    ``compute_opsm_mask`` (which tests the per-token advantage, as here). Default ``delta = 1e-4``
    is slime's ``--opsm-delta``. No clamp on the log difference (as in TRL / slime).
    """
    d = (logp_mu_BT.detach() - logp_theta_BT.detach())
    valid = mask_BT.bool()
    d = torch.where(valid, d, torch.zeros_like(d))
    m = mask_BT.to(d.dtype)
    kl_B = d.sum(-1) / m.sum(-1).clamp(min=1.0)
    drop = (advantages_BT.detach() < 0) & (kl_B[:, None] > delta)
    return ~drop & valid


# ----------------------------------------------------------------------------------------------
# Presets


def _require_mu(inputs: LossInputs, preset: str) -> Tensor:
    inputs.require("logp_mu_BT", preset=preset)
    assert inputs.logp_mu_BT is not None
    return inputs.logp_mu_BT


def _agg(inputs: LossInputs, loss_BT: Tensor, agg: str) -> Tensor:
    return aggregate(
        loss_BT, inputs.mask_BT, agg, num_tokens=inputs.num_tokens, num_seqs=inputs.num_seqs, horizon=inputs.horizon
    )


def weighted_ppo(
    inputs: LossInputs, w_BT: Tensor, agg: str, eps_low: float, eps_high: float, dual_clip_c: float | None
) -> tuple[Tensor, dict[str, Tensor]]:
    """``agg(w * l^PPO)`` on ``r = pi_theta / pi_old`` with the PPO and policy metrics."""
    lr = token_log_ratio(inputs.logp_theta_BT, inputs.logp_old_BT, inputs.mask_BT)
    loss_BT, ratio, pg = _ppo_clip(
        lr, inputs.advantages_BT, inputs.mask_BT, eps_low=eps_low, eps_high=eps_high, dual_clip_c=dual_clip_c,
        weight_BT=w_BT,
    )
    return _agg(inputs, loss_BT, agg), {**pg, **policy_metrics(inputs, log_ratio_BT=lr, ratio_BT=ratio)}


def tis(
    inputs: LossInputs,
    *,
    agg: str,
    eps_low: float,
    eps_high: float,
    dual_clip_c: float | None,
    level: str,
    cap: float,
    floor: float,
    self_normalise: bool,
    length_calibration: str = "none",
    ref_len: float | None = None,
    length_drift: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clip on ``r = pi_theta/pi_old`` times truncated IS weights of ``pi_old/mu``.

    ``l_t = w_t * l^PPO_t`` with ``w`` from ``truncated_is_weights`` (optionally self-normalised).
    Gradient: ``w_t * grad l^PPO_t``. ``length_calibration`` (``none`` | ``geo`` | ``sqrt``, with ``level`` sequence
    and ``ref_len``): the cap and floor are meant at length ``ref_len`` and scale with each row's length
    (docs/objectives_notes/length_calibration.md).
    """
    mu = _require_mu(inputs, "tis")
    w, metrics = truncated_is_weights(inputs.logp_old_BT, mu, inputs.mask_BT, level=level, cap=cap, floor=floor,
                                      length_calibration=length_calibration, ref_len=ref_len,
                                      length_drift=length_drift)
    if self_normalise:
        w, norm = self_normalised_weights(w, inputs.mask_BT, level=level)
        metrics["tis/batch_norm_factor"] = norm
        metrics.update(weight_metrics(w, inputs.mask_BT, "tis/normalised"))
    loss, pg = weighted_ppo(inputs, w, agg, eps_low, eps_high, dual_clip_c)
    return loss, {**pg, **metrics}


def icepop(
    inputs: LossInputs,
    *,
    agg: str,
    eps_low: float,
    eps_high: float,
    dual_clip_c: float | None,
    low: float,
    high: float,
    level: str = "token",
    length_calibration: str = "none",
    ref_len: float | None = None,
    length_drift: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clip on ``r = pi_theta/pi_old`` times IcePop weights ``rho_t 1[low <= rho_t <= high]``.

    ``level`` sequence / geometric: the band and the weight on the row's product / geometric-mean ratio;
    ``length_calibration`` (sequence level, with ``ref_len``): the band is meant at length ``ref_len`` and scales
    with each row's length (docs/objectives_notes/length_calibration.md)."""
    mu = _require_mu(inputs, "icepop")
    w, metrics = icepop_weights(inputs.logp_old_BT, mu, inputs.mask_BT, low=low, high=high, level=level,
                                length_calibration=length_calibration, ref_len=ref_len, length_drift=length_drift)
    loss, pg = weighted_ppo(inputs, w, agg, eps_low, eps_high, dual_clip_c)
    return loss, {**pg, **metrics}


def masked_is_weights(
    logp_old_BT: Tensor,
    logp_mu_BT: Tensor,
    mask_BT: Tensor,
    *,
    level: str | ISLevel = ISLevel.SEQUENCE,
    low: float = 0.5,
    high: float = 2.0,
    weighted: bool = True,
    veto: float | None = CATASTROPHIC_RATIO,
    prefix: str = "mis",
    length_calibration: str | LengthCalibration = LengthCalibration.NONE,
    ref_len: float | None = None,
    length_drift: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Masked importance sampling (MIS): ``w = rho_L * 1[low <= rho_L <= high] * 1[no veto]``.

    ``rho_L`` is the ratio at ``level``: token ``rho_t``; sequence ``exp(sum_t m delta_t)``;
    geometric ``exp(mean_t delta_t)``. The band test uses the unclamped log-ratio; the weight uses
    ``level_log_ratio`` (sequence sum clamped at +-20 before exp). ``weighted=False`` gives pure
    rejection (weight 1 inside the band). ``veto``: catastrophic-token veto threshold (``None``
    disables it). Detached; 0 on padding and dropped tokens.
    Metrics: weight stats, ``maskfrac_band`` (outside the band), ``maskfrac_veto`` (vetoed) and
    ``maskfrac`` (dropped for any reason), as loss-token fractions.
    Length calibration (``level="sequence"`` only; ``length_calibration`` module): the band is meant at length
    ``ref_len`` and becomes ``[low(T_i), high(T_i)]`` per row; extra metrics ``calib_log_low|high_min|max``.
    """
    level = ISLevel.parse(level)
    cal = check_length_calibration(length_calibration, ref_len, length_drift, level=level.value)
    if not high >= low:
        raise ValueError(f"masked_is_weights: high ({high}) must be >= low ({low})")
    valid = mask_BT.bool()
    delta = behaviour_log_ratio(logp_old_BT, logp_mu_BT, mask_BT)  # computed once, every criterion reads it
    m = float_mask(valid, delta.dtype)
    dt = delta.dtype
    calib: dict[str, Tensor] = {}
    vetoed_B = None if veto is None else _veto_keep_B(delta, valid, veto)
    len_B = m.sum(-1).to(torch.float64)
    n = len_B.sum().clamp(min=1.0)
    if level is ISLevel.TOKEN:
        band = _band_keep(delta, valid, low, high)
        keep = band if vetoed_B is None else band & vetoed_B[:, None]
        w = torch.exp(delta) if weighted else torch.ones_like(delta)
        # w is finite (|delta| <= 20): the 0/1 keep-mask zeroes dropped tokens and padding exactly
        w = w * float_mask(keep, dt)
        dropped = masked_means({"band": ~band, "any": ~keep}, valid, dtype=torch.float64)
        frac_band, frac_any = dropped["band"], dropped["any"]
    else:
        # every criterion is per sequence: decide on [B] rows, then broadcast once
        if cal is LengthCalibration.NONE:
            band_B = _sequence_keep_B(delta, m, low, high, geometric=level is ISLevel.GEOMETRIC)
        else:
            lo_B, hi_B, calib = sequence_log_bounds(m, low, high, length_calibration=cal, ref_len=ref_len,
                                                    length_drift=length_drift, prefix=prefix)
            log_s = sequence_log_ratio(delta, m).to(torch.float64)
            band_B = (log_s >= lo_B) & (log_s <= hi_B)
        keep_B = band_B if vetoed_B is None else band_B & vetoed_B
        if weighted:
            if level is ISLevel.SEQUENCE:
                log_w_B = sequence_log_ratio(delta, m).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
            else:
                log_w_B = geometric_log_ratio(delta, m)
            w_B = torch.where(keep_B, torch.exp(log_w_B), 0.0)
        else:
            w_B = keep_B.to(dt)
        w = w_B[:, None] * m
        frac_band = (len_B * ~band_B).sum() / n
        frac_any = (len_B * ~keep_B).sum() / n
    if vetoed_B is None:
        frac_veto = torch.zeros((), dtype=torch.float64, device=delta.device)
    else:
        frac_veto = (len_B * ~vetoed_B).sum() / n
    wm = _weight_and_mismatch_metrics(w, delta, valid, prefix)
    metrics = {
        **{k: wm[k] for k in (f"{prefix}/weight_mean", f"{prefix}/weight_std", f"{prefix}/weight_max")},
        f"{prefix}/maskfrac_band": frac_band.to(dt),
        f"{prefix}/maskfrac_veto": frac_veto.to(dt),
        f"{prefix}/maskfrac": frac_any.to(dt),
        **{k: v.to(dt) for k, v in calib.items()},
        **{k: wm[k] for k in ("mismatch/kl_k1", "mismatch/kl_k3")},
    }
    return w, metrics


def mis(
    inputs: LossInputs,
    *,
    agg: str,
    eps_low: float,
    eps_high: float,
    dual_clip_c: float | None,
    level: str,
    low: float,
    high: float,
    weighted: bool,
    veto: float | None,
    length_calibration: str = "none",
    ref_len: float | None = None,
    length_drift: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clip on ``r = pi_theta/pi_old`` times masked IS weights of ``pi_old/mu``.

    ``length_calibration`` (``none`` | ``geo`` | ``sqrt``, with ``level`` sequence and ``ref_len``): the band is meant
    at length ``ref_len`` and scales with each row's length (docs/objectives_notes/length_calibration.md)."""
    mu = _require_mu(inputs, "mis")
    w, metrics = masked_is_weights(
        inputs.logp_old_BT, mu, inputs.mask_BT, level=level, low=low, high=high, weighted=weighted, veto=veto,
        length_calibration=length_calibration, ref_len=ref_len, length_drift=length_drift,
    )
    loss, pg = weighted_ppo(inputs, w, agg, eps_low, eps_high, dual_clip_c)
    return loss, {**pg, **metrics}


_PPO_DEFAULTS = {"agg": "token-mean", "eps_low": 0.2, "eps_high": 0.2, "dual_clip_c": 3.0}
LENGTH_DEFAULTS = {"length_calibration": "none", "ref_len": None, "length_drift": 0.0}
"""The length-calibration hyper-parameters of ``tis``, ``mis`` and ``icepop`` (off by default)."""
LENGTH_EQUATION = (
    "; length_calibration geo|sqrt (level sequence; bound B meant at T0 = ref_len, row length T): "
    "log B(T) = (T/T0) log B | m T + sqrt(T/T0) (log B - m T0), m = length_drift"
)


def check_length_args(args: Mapping[str, Any]) -> None:
    """Start-up check of a preset's length-calibration hyper-parameters (``Preset.check``)."""
    check_length_calibration(args["length_calibration"], args["ref_len"], args["length_drift"],
                             level=ISLevel.parse(args["level"]).value)


register(Preset(
    name="tis",
    description="PPO clip times truncated IS weights min(pi_old/mu, C) (C=2, token level).",
    fn=tis,
    defaults={**_PPO_DEFAULTS, "level": "token", "cap": 2.0, "floor": 0.0, "self_normalise": False,
              **LENGTH_DEFAULTS},
    check=check_length_args,
    advantage="grpo",
    source=(
        "Yao et al. 2025 (Your efficient RL framework secretly brings you off-policy RL training, TIS); "
        "verl rollout_corr_helper (rollout_is_threshold=2.0); slime --tis-clip 2.0; ROLL infer_is tau_max 2.0"
    ),
    requires=("logp_mu_BT",),
    equation=(
        "w_t = min(exp(log pi_old - log mu), C) (sequence: exp(sum_t log pi_old/mu) broadcast), sg; "
        "l_t = w_t * max(-A r_t, -A clip(r_t, 1-eps_low, 1+eps_high)); A<0: min(., -A c)"
        f"{LENGTH_EQUATION}"
    ),
))
register(Preset(
    name="icepop",
    description="PPO clip times IcePop weights: pi_old/mu kept inside [0.5, 5], tokens outside masked.",
    fn=icepop,
    defaults={**_PPO_DEFAULTS, "low": 0.5, "high": 5.0, "level": "token", **LENGTH_DEFAULTS},
    check=check_length_args,
    advantage="grpo",
    source=(
        "Ling team 2025 (Every Step Evolves: Ring-1T, IcePop); slime icepop_function; "
        "verl rollout_is_threshold '0.5_5.0' (not rollout_rs token_k1 '0.5_5.0': that is tether [0.2, 2]); "
        "AReaL RejectionSamplingConfig(action=mask, metric=ratio)"
    ),
    requires=("logp_mu_BT",),
    equation=("rho_t = pi_old/mu (level sequence: exp(sum_t m log pi_old/mu) broadcast); "
              f"w_t = rho_t 1[low <= rho_t <= high], sg; l_t = w_t * l^PPO_t{LENGTH_EQUATION}"),
))
register(Preset(
    name="mis",
    description="PPO clip times masked IS: sequences with pi_old/mu outside [0.5, 2] (or a 1e-4 token) dropped.",
    fn=mis,
    defaults={**_PPO_DEFAULTS, "level": "sequence", "low": 0.5, "high": 2.0, "weighted": True, "veto": 1e-4,
              **LENGTH_DEFAULTS},
    check=check_length_args,
    advantage="grpo",
    source=(
        "Liu, Li et al. 2025 (When Speed Kills Stability: seq-MIS); methods.md §0 MIS; "
        "verl rollout_rs seq_sum_k1 '0.5_2.0' (a reciprocal band: the same in verl's mirrored log(mu/pi_old)); "
        "ROLL catastrophic reject 1e-4; slime mis.py rs_veto_threshold"
    ),
    requires=("logp_mu_BT",),
    equation=(
        "rho_i = exp(sum_t m (log pi_old - log mu)); w_i = rho_i 1[low <= rho_i <= high] "
        "1[min_t pi_old/mu >= veto], sg; l_t = w_i * l^PPO_t"
        f"{LENGTH_EQUATION}"
    ),
))
