"""Decoupled PPO, PPO-EWMA and DPPO: trust regions around a proximal / old policy.

Decoupled PPO (Hilton et al. 2021; AReaL, Fu et al. 2025) splits ``pi_theta / mu`` into a clipped
staleness factor ``pi_theta / pi_prox`` and a detached behaviour IS weight ``pi_prox / mu``
(methods.md §3 (a)3). ``roll_infer_correction`` is the train-inference correction in ROLL's
order (token IS weight, then token / catastrophic / sequence rejection); ``loglinear_prox_logp``
is AReaL's version-interpolated proximal policy; ``ppo_ewma_loss`` / ``ewma_update`` are
PPO-EWMA exactly as in openai/ppo-ewma; ``dppo_loss`` is DPPO's binary TV / KL trust-region mask
(Qi et al. 2026, verl ``dppo_tv`` / ``dppo_kl``). Notes: docs/objectives_notes/corrections.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import Enum

import torch
from torch import Tensor

from tether.objectives.closed_form import elementwise_loss
from tether.objectives.inputs import LossInputs, float_mask, indicator, masked_mean, masked_means
from tether.objectives.policy_gradient import policy_metrics, ppo_clip_loss
from tether.objectives.ratios import token_log_ratio
from tether.objectives.registry import Preset, register
from tether.objectives.rollout_correction import (
    CATASTROPHIC_RATIO,
    ISLevel,
    _agg,
    _weight_and_mismatch_metrics,
    behaviour_log_ratio,
    catastrophic_veto_mask,
    dropped_fraction,
    icepop_mask,
    log_bound,
    mismatch_metrics,
    sequence_ratio_mask,
    truncated_is_weights,
    weight_metrics,
)


class CapMode(str, Enum):
    MASK = "mask"
    CLAMP = "clamp"


# ----------------------------------------------------------------------------------------------
# Decoupled PPO


def behaviour_weights(
    logp_prox_BT: Tensor,
    logp_mu_BT: Tensor,
    mask_BT: Tensor,
    *,
    cap: float | None = None,
    cap_mode: str | CapMode = CapMode.MASK,
    prefix: str = "decoupled",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Behaviour IS weight ``w_t = pi_prox(y_t) / mu(y_t)``, detached (log-ratio clamped to +-20).

    ``cap``: ``mask`` mode zeroes tokens with ``w_t > cap`` (AReaL ``behave_imp_weight_cap``, now
    ``RejectionSamplingConfig(action=mask)``); ``clamp`` mode uses ``min(w_t, cap)`` (FeynRL
    ``behave_imp_weight_cap``, AReaL ``action=clamp``). ``None``: no cap. 0 on padding.
    Metrics: weight stats and ``capfrac`` (loss tokens with ``w_t > cap``).
    """
    mode = CapMode(cap_mode)
    valid = mask_BT.bool()
    delta = behaviour_log_ratio(logp_prox_BT, logp_mu_BT, mask_BT)
    w = torch.exp(delta)
    # w is finite (|delta| <= 20), so products with 0/1 indicators select exactly
    over = indicator(torch.gt, delta, math.inf if cap is None else log_bound(cap))
    if cap is not None:
        w = w * (1.0 - over) if mode is CapMode.MASK else w.clamp(max=cap)
    w = w * float_mask(valid, w.dtype)
    wm = _weight_and_mismatch_metrics(w, delta, valid, prefix, kl_prefix=f"{prefix}/behave")
    metrics = {
        **{k: wm[k] for k in (f"{prefix}/weight_mean", f"{prefix}/weight_std", f"{prefix}/weight_max")},
        f"{prefix}/capfrac": masked_mean(over, valid),
        **{k: wm[k] for k in (f"{prefix}/behave/kl_k1", f"{prefix}/behave/kl_k3")},
    }
    return w, metrics


def decoupled_ppo_loss(
    logp_theta_BT: Tensor,
    logp_prox_BT: Tensor,
    logp_mu_BT: Tensor,
    advantages_BT: Tensor,
    mask_BT: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip_c: float | None = None,
    behave_cap: float | None = None,
    cap_mode: str | CapMode = CapMode.MASK,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Decoupled PPO per-token loss (Hilton et al. 2021, eq. decoupled; AReaL ``ppo_actor_loss_fn``).

    ``r_t = pi_theta / pi_prox``; ``w_t = sg(pi_prox / mu)`` (optionally capped, see
    ``behaviour_weights``); ``l_t = w_t * max(-A r_t, -A clip(r_t, 1-eps_low, 1+eps_high))``
    (dual clip ``c`` optional). Gradient: ``w_t * grad l^PPO_t`` with the clip around ``pi_prox``.
    """
    w, metrics = behaviour_weights(logp_prox_BT, logp_mu_BT, mask_BT, cap=behave_cap, cap_mode=cap_mode)
    lr = token_log_ratio(logp_theta_BT, logp_prox_BT.detach(), mask_BT)
    loss, pg = ppo_clip_loss(
        lr, advantages_BT, mask_BT, eps_low=eps_low, eps_high=eps_high, dual_clip_c=dual_clip_c, weight_BT=w
    )
    return loss, {**pg, **metrics}


def roll_infer_correction(
    logp_old_BT: Tensor,
    logp_mu_BT: Tensor,
    mask_BT: Tensor,
    *,
    is_level: str | None = "token",
    is_min: float = 0.0,
    is_max: float = 2.0,
    token_reject: tuple[float, float] | None = None,
    catastrophic: float | None = CATASTROPHIC_RATIO,
    seq_reject: str | None = None,
    seq_bounds: tuple[float, float] = (0.1, 10.0),
    prefix: str = "infer",
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Train-inference correction of ``pi_old / mu`` in ROLL's order (``InferCorrectionHandler``).

    1. IS weight (``is_level`` ``token`` | ``sequence`` | ``None``):
       ``w = clamp(exp(delta), is_min, is_max)`` per token, or of the (+-20-clamped) sequence sum,
       broadcast; ``None`` gives ``w = 1``.
    2. token reject: drop tokens with ratio outside ``token_reject = (min, max)``;
    3. catastrophic reject: drop a sequence if any token ratio ``< catastrophic``;
    4. sequence reject (``seq_reject`` ``sequence`` = product | ``geometric`` = geometric mean):
       drop sequences whose ratio is outside ``seq_bounds``.
    Returns ``(w_BT, keep_BT, metrics)``; the per-token loss is ``keep * w * l^PPO``.
    Metrics: weight stats; ``rejectfrac_token|catastrophic|sequence`` (each criterion on its own)
    and ``rejectfrac`` (any), loss-token fractions; ``kl_k1|k3`` before and after rejection.
    ROLL defaults (methods.md (a)3): IS ``[0, 2]``, token mask max 2, catastrophic 1e-4,
    sequence mask ``[0.1, 10]``.
    """
    valid = mask_BT.bool()
    delta = behaviour_log_ratio(logp_old_BT, logp_mu_BT, mask_BT)
    if is_level is None:
        w = mask_BT.to(delta.dtype)
        metrics: dict[str, Tensor] = weight_metrics(w, mask_BT, prefix)
    else:
        level = ISLevel.parse(is_level, field="is_level")
        if level is ISLevel.GEOMETRIC:
            raise ValueError("roll_infer_correction: is_level must be 'token', 'sequence' or None")
        w, tis_m = truncated_is_weights(
            logp_old_BT, logp_mu_BT, mask_BT, level=level, cap=is_max, floor=is_min, prefix=prefix
        )
        metrics = {k: v for k, v in tis_m.items() if k.startswith(prefix)}
    keep = valid
    dt = delta.dtype
    if token_reject is not None:
        k_tok = icepop_mask(logp_old_BT, logp_mu_BT, mask_BT, low=token_reject[0], high=token_reject[1])
        metrics[f"{prefix}/rejectfrac_token"] = dropped_fraction(k_tok, mask_BT).to(dt)
        keep = keep & k_tok
    if catastrophic is not None:
        k_cat = catastrophic_veto_mask(logp_old_BT, logp_mu_BT, mask_BT, threshold=catastrophic)
        metrics[f"{prefix}/rejectfrac_catastrophic"] = dropped_fraction(k_cat, mask_BT).to(dt)
        keep = keep & k_cat
    if seq_reject is not None:
        if seq_reject not in ("sequence", "geometric"):
            raise ValueError(f"roll_infer_correction: unknown seq_reject '{seq_reject}'; valid: sequence, geometric")
        k_seq = sequence_ratio_mask(
            logp_old_BT, logp_mu_BT, mask_BT, low=seq_bounds[0], high=seq_bounds[1],
            geometric=seq_reject == "geometric",
        )
        metrics[f"{prefix}/rejectfrac_sequence"] = dropped_fraction(k_seq, mask_BT).to(dt)
        keep = keep & k_seq
    metrics[f"{prefix}/rejectfrac"] = dropped_fraction(keep, mask_BT).to(dt)
    metrics.update(mismatch_metrics(delta, mask_BT, prefix=f"{prefix}/before"))
    metrics.update(mismatch_metrics(delta, keep, prefix=f"{prefix}/after"))
    return w, keep, metrics


def loglinear_prox_logp(
    logp_theta_BT: Tensor,
    logp_mu_BT: Tensor,
    versions_BT: Tensor,
    *,
    v_theta: int,
    v_prox: int | None = None,
) -> Tensor:
    """AReaL's log-linear proximal approximation (``prox_logp_method=loglinear``), detached.

    ``log pi_prox ~ log mu + alpha (log pi_theta - log mu)``,
    ``alpha_t = clamp((v_prox - v_mu,t) / (v_theta - v_mu,t), 0, 1)`` where ``v_theta > v_mu,t``,
    else ``alpha_t = 0``; tokens with ``v_mu,t < 0`` (prompt / not generated) get ``alpha = 0``.
    ``logp_theta`` is the current policy at version ``v_theta`` (AReaL uses the training forward's
    log-probs, detached); ``v_prox`` defaults to ``v_theta - 1`` (the last broadcast version).
    Source: areal/trainer/ppo/actor.py ``compute_prox_logp_approximations`` (AReaL PR #600).
    """
    vp = v_theta - 1 if v_prox is None else v_prox
    v_mu = versions_BT.to(logp_theta_BT.dtype)
    diff = v_theta - v_mu
    ok = (diff > 0) & (versions_BT >= 0)
    alpha = torch.where(ok, (vp - v_mu) / torch.where(ok, diff, torch.ones_like(diff)), torch.zeros_like(v_mu))
    alpha = alpha.clamp(0.0, 1.0)
    mu = logp_mu_BT.detach()
    return mu + alpha * (logp_theta_BT.detach() - mu)


# ----------------------------------------------------------------------------------------------
# PPO-EWMA


def ppo_ewma_loss(
    logp_theta_BT: Tensor,
    logp_ewma_BT: Tensor,
    logp_mu_BT: Tensor,
    advantages_BT: Tensor,
    mask_BT: Tensor,
    *,
    eps: float = 0.2,
    imp_samp_max: float = 100.0,
    kl_penalty: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-EWMA per-token loss, in log space (openai/ppo-ewma ``ppo.py::compute_losses``).

    ``l_adj = max(log mu, sg(log pi_theta) - log imp_samp_max)``;
    ``l1 = -A exp(log pi_theta - l_adj)``;
    ``l2 = -A exp(clip(log pi_theta - log pi_ewma, log(1-eps), log(1+eps)) + log pi_ewma - l_adj)``;
    ``l = max(l1, l2) + kl_penalty * 0.5 (log pi_theta - log pi_ewma)^2``.
    So the clip is relative to ``pi_ewma`` and the IS weight ``pi_ewma / mu`` is implicitly capped
    at ``imp_samp_max`` (methods.md (a)3). No log-ratio clamp (as in the original).
    Metrics: ``ppo_ewma/clipfrac`` (tokens where ``l2 > l1``), ``approxkl`` = ``0.5 E[(log pi -
    log pi_ewma)^2]``, ``imp_samp_clipfrac`` (tokens where ``pi_theta / mu > imp_samp_max``).
    """
    A = advantages_BT.detach()
    valid = mask_BT.bool()
    # keep padding finite whatever its contents
    ewma = torch.where(valid, logp_ewma_BT.detach(), 0.0)
    mu = torch.where(valid, logp_mu_BT.detach(), 0.0)
    lo = math.log1p(-eps) if eps < 1.0 else -math.inf  # eps >= 1: no lower clip (eps = inf: no clip)
    hi = math.log1p(eps)

    def value_and_grad(x: Tensor) -> tuple[Tensor, ...]:
        # with lp = m x: d l1/d lp = l1; d l2/d lp = l2 1[lo <= lp - ewma <= hi] (the clamp passes on
        # its closed range); max takes the larger branch's derivative (the unclipped one on a tie,
        # which inside the clip range is what autograd's half-and-half split adds up to);
        # the KL penalty adds kl_penalty (lp - ewma); everything is 0 on padding.
        lp = torch.where(valid, x, 0.0)
        adj = torch.maximum(mu, lp - math.log(imp_samp_max))
        neg_A = -A
        l1 = neg_A * torch.exp(lp - adj)
        diff = lp - ewma
        clipped = diff.clamp(lo, hi)
        l2 = neg_A * torch.exp(clipped + ewma - adj)
        loss = torch.maximum(l1, l2)
        l2_wins = l2 > l1
        grad = torch.where(l2_wins, torch.where(clipped == diff, l2, 0.0), l1)
        sq = diff**2
        if kl_penalty:
            loss = loss + kl_penalty * 0.5 * sq
            grad = grad + kl_penalty * diff
        grad = torch.where(valid, grad, 0.0)
        return loss, grad, l2_wins, sq, indicator(torch.lt, mu, lp - math.log(imp_samp_max))

    loss, l2_wins, sq, capped = elementwise_loss(logp_theta_BT, value_and_grad)
    means = masked_means({"clipfrac": l2_wins, "approxkl": sq, "imp_samp_clipfrac": capped}, valid, dtype=loss.dtype)
    metrics = {
        "ppo_ewma/clipfrac": means["clipfrac"],
        "ppo_ewma/approxkl": 0.5 * means["approxkl"],
        "ppo_ewma/imp_samp_clipfrac": means["imp_samp_clipfrac"],
    }
    return loss, metrics


def ewma_update(
    ewma_params: Sequence[Tensor], params: Sequence[Tensor], total_weight: float, *, beta: float
) -> tuple[list[Tensor], float]:
    """Bias-corrected EWMA of parameters (openai/ppo-ewma ``ppg.py::EwmaModel.update``).

    ``W' = beta W + 1``; ``theta_ewma <- (beta W / W') theta_ewma + theta / W'``. Returns the new
    tensors (inputs untouched) and ``W'``. ``W = 0`` (fresh, or reset after the PPG auxiliary
    phase) gives ``theta_ewma = theta``. Call after every policy optimiser step.
    """
    if len(ewma_params) != len(params):
        raise ValueError(f"ewma_update: {len(ewma_params)} EWMA tensors but {len(params)} parameters")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"ewma_update: beta must be in [0, 1], got {beta}")
    new_w = beta * total_weight + 1.0
    keep = beta * total_weight / new_w
    out = []
    for e, p in zip(ewma_params, params):
        if e.shape != p.shape:
            raise ValueError(f"ewma_update: shape mismatch {tuple(e.shape)} vs {tuple(p.shape)}")
        out.append(keep * e.detach() + p.detach() / new_w)
    return out, new_w


# ----------------------------------------------------------------------------------------------
# DPPO


class DPPODivergence(str, Enum):
    TV = "tv"
    KL = "kl"


def dppo_valid_mask(
    logp_theta_BT: Tensor,
    logp_old_BT: Tensor,
    advantages_BT: Tensor,
    mask_BT: Tensor,
    *,
    divergence: str | DPPODivergence = DPPODivergence.TV,
    delta_low: float = 0.15,
    delta_high: float = 0.15,
) -> Tensor:
    """DPPO binary trust-region mask (Qi et al. 2026, arXiv 2602.04879; verl ``dppo_tv``/``dppo_kl``).

    With ``p = pi_theta(y_t)``, ``q = pi_old(y_t)`` (probabilities of the sampled token):
    TV: keep iff ``p - q <= delta_high`` when ``A > 0``, and ``p - q >= -delta_low`` otherwise,
        i.e. a token is masked only once it has moved beyond the region *in the direction its
        advantage pushes*;
    KL: ``D = q log(q/p) + (1-q) log((1-q+1e-8)/(1-p+1e-8))`` (Bernoulli KL); keep iff
        ``D <= delta_high or p <= q`` when ``A > 0``, and ``D <= delta_low or p >= q`` otherwise.
    Detached bool mask, False on padding.
    """
    kind = DPPODivergence(divergence)
    lp = logp_theta_BT.detach()
    lq = logp_old_BT.detach()
    p, q = torch.exp(lp), torch.exp(lq)
    pos = advantages_BT.detach() > 0
    if kind is DPPODivergence.TV:
        keep = torch.where(pos, (p - q) <= delta_high, (p - q) >= -delta_low)
    else:
        d = q * (lq - lp) + (1 - q) * torch.log((1.0 - q + 1e-8) / (1.0 - p + 1e-8))
        keep = torch.where(pos, (d <= delta_high) | (p <= q), (d <= delta_low) | (p >= q))
    return keep & mask_BT.bool()


def dppo_loss(
    logp_theta_BT: Tensor,
    logp_old_BT: Tensor,
    advantages_BT: Tensor,
    mask_BT: Tensor,
    *,
    divergence: str | DPPODivergence = DPPODivergence.TV,
    delta_low: float = 0.15,
    delta_high: float = 0.15,
    ratio_cap: float = 20.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DPPO per-token loss (verl ``compute_policy_loss_dppo_tv`` / ``_kl``).

    ``r_t = exp(clamp(log pi_theta - log pi_old, -20, 20))``;
    ``l_t = -A_t * sg(min(r_t, ratio_cap)) * log pi_theta(y_t) * M_t`` with ``M`` from
    ``dppo_valid_mask``. Gradient: ``-A M min(r, cap) grad log pi_theta`` (the unclipped PPO
    gradient inside the trust region, 0 outside).
    Metrics: ``dppo/maskfrac`` (1 - M over loss tokens), ``dppo/capfrac`` (kept tokens with
    ``r > ratio_cap``).
    """
    lr = token_log_ratio(logp_theta_BT.detach(), logp_old_BT.detach(), mask_BT)
    ratio = torch.exp(lr)
    w = ratio.clamp(max=ratio_cap)
    keep = dppo_valid_mask(
        logp_theta_BT, logp_old_BT, advantages_BT, mask_BT,
        divergence=divergence, delta_low=delta_low, delta_high=delta_high,
    )
    coef = torch.where(keep, -advantages_BT.detach() * w, torch.zeros_like(w))
    lp = torch.where(mask_BT.bool(), logp_theta_BT, torch.zeros_like(logp_theta_BT))
    loss = coef * lp
    dt = loss.dtype
    metrics = {
        "dppo/maskfrac": dropped_fraction(keep, mask_BT).to(dt),
        "dppo/capfrac": masked_mean(((ratio > ratio_cap) & keep).to(dt), mask_BT),
    }
    return loss, metrics


# ----------------------------------------------------------------------------------------------
# Presets


def decoupled_ppo(
    inputs: LossInputs,
    *,
    agg: str,
    eps_low: float,
    eps_high: float,
    dual_clip_c: float | None,
    behave_cap: float | None,
    cap_mode: str,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Decoupled PPO: clip around ``pi_prox``, times ``sg(pi_prox / mu)`` (see ``decoupled_ppo_loss``)."""
    inputs.require("logp_prox_BT", "logp_mu_BT", preset="decoupled_ppo")
    assert inputs.logp_prox_BT is not None and inputs.logp_mu_BT is not None
    loss_BT, metrics = decoupled_ppo_loss(
        inputs.logp_theta_BT, inputs.logp_prox_BT, inputs.logp_mu_BT, inputs.advantages_BT, inputs.mask_BT,
        eps_low=eps_low, eps_high=eps_high, dual_clip_c=dual_clip_c, behave_cap=behave_cap, cap_mode=cap_mode,
    )
    return _agg(inputs, loss_BT, agg), {**metrics, **policy_metrics(inputs)}


def ppo_ewma(
    inputs: LossInputs, *, agg: str, eps: float, imp_samp_max: float, kl_penalty: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-EWMA with ``logp_prox_BT`` = the EWMA policy's log-probs (see ``ppo_ewma_loss``)."""
    inputs.require("logp_prox_BT", "logp_mu_BT", preset="ppo_ewma")
    assert inputs.logp_prox_BT is not None and inputs.logp_mu_BT is not None
    loss_BT, metrics = ppo_ewma_loss(
        inputs.logp_theta_BT, inputs.logp_prox_BT, inputs.logp_mu_BT, inputs.advantages_BT, inputs.mask_BT,
        eps=eps, imp_samp_max=imp_samp_max, kl_penalty=kl_penalty,
    )
    return _agg(inputs, loss_BT, agg), {**metrics, **policy_metrics(inputs)}


def dppo(
    inputs: LossInputs, *, agg: str, divergence: str, delta_low: float, delta_high: float, ratio_cap: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """DPPO binary TV / KL trust region around ``pi_old`` (see ``dppo_loss``)."""
    loss_BT, metrics = dppo_loss(
        inputs.logp_theta_BT, inputs.logp_old_BT, inputs.advantages_BT, inputs.mask_BT,
        divergence=divergence, delta_low=delta_low, delta_high=delta_high, ratio_cap=ratio_cap,
    )
    return _agg(inputs, loss_BT, agg), {**metrics, **policy_metrics(inputs)}


register(Preset(
    name="decoupled_ppo",
    description="Decoupled PPO: clip on pi_theta/pi_prox times sg(pi_prox/mu), tokens with weight > 5 masked.",
    fn=decoupled_ppo,
    defaults={
        "agg": "token-mean", "eps_low": 0.2, "eps_high": 0.2, "dual_clip_c": None,
        "behave_cap": 5.0, "cap_mode": "mask",
    },
    advantage="grpo",
    source=(
        "Hilton, Cobbe, Schulman 2021 (Batch size-invariance for policy optimization); Fu et al. 2025 (AReaL) "
        "ppo_actor_loss_fn + RejectionSamplingConfig(upper=5, action=mask); missing pi_prox can be filled by "
        "loglinear_prox_logp (AReaL prox_logp_method=loglinear)"
    ),
    requires=("logp_prox_BT", "logp_mu_BT"),
    equation=(
        "r_t = pi_theta/pi_prox; w_t = sg(pi_prox/mu) 1[w_t <= cap]; "
        "l_t = w_t max(-A r_t, -A clip(r_t, 1-eps_low, 1+eps_high))"
    ),
))
register(Preset(
    name="ppo_ewma",
    description="PPO-EWMA: clip around the EWMA policy (logp_prox_BT), IS weight pi_ewma/mu capped at 100.",
    fn=ppo_ewma,
    defaults={"agg": "token-mean", "eps": 0.2, "imp_samp_max": 100.0, "kl_penalty": 0.0},
    advantage="grpo",
    source="Hilton et al. 2021; openai/ppo-ewma ppo.py compute_losses (imp_samp_max=100), ppg.py EwmaModel",
    requires=("logp_prox_BT", "logp_mu_BT"),
    equation=(
        "l_adj = max(log mu, sg(log pi) - log 100); l_t = max(-A exp(log pi - l_adj), "
        "-A exp(clip(log pi - log pi_ewma, log(1-eps), log(1+eps)) + log pi_ewma - l_adj))"
    ),
))
register(Preset(
    name="dppo",
    description="DPPO-Binary-TV: unclipped IS policy gradient, tokens outside a TV trust region (0.15) masked.",
    fn=dppo,
    defaults={
        "agg": "seq-mean-token-sum-norm", "divergence": "tv", "delta_low": 0.15, "delta_high": 0.15,
        "ratio_cap": 20.0,
    },
    advantage="dr_grpo",
    source=(
        "Qi et al. 2026 (Rethinking the Trust Region in LLM RL, arXiv 2602.04879); verl core_algos "
        "dppo_tv / dppo_kl and examples/dppo_trainer (TV 0.15, KL 0.05, seq-mean-token-sum-norm, no std)"
    ),
    equation=(
        "l_t = -A sg(min(r_t, c)) log pi_theta(y_t) M_t; TV: M_t = [p-q <= d_high] if A>0 else [p-q >= -d_low]; "
        "KL: M_t = [D_bern(q||p) <= d or p moved against A]"
    ),
))

