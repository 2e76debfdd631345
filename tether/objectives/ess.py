"""Effective-sample-size adaptive objectives: P3O and P4O ("Trust the Batch", FeynRL).

The batch's own effective sample size of the importance weights replaces PPO's clip constants:
the weight on the score function is capped at ``ESS`` and a k3 trust-region term is switched on
in proportion to ``1 - ESS``.

Micro-batch invariance: ESS is a *batch* statistic, so computing it per micro-batch (what FeynRL
does, per micro-batch and all-reduced over data-parallel ranks) makes the loss depend on how the
batch is split. For an exact split-invariant loss the caller computes ESS once over the whole
optimiser step and passes it as the ``ess`` hyper-parameter (``ess_b`` / ``ess_p`` for P4O). ESS
is a function of three additive sums, so the caller can accumulate ``ess_sums`` over micro-batches
(and all-reduce them over ranks) and finish with ``ess_from_sums``. Left as ``None``, ESS is
computed from the tensors given (FeynRL's per-micro-batch behaviour).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tether.objectives.aggregation import aggregate
from tether.objectives.closed_form import elementwise_loss
from tether.objectives.inputs import LossInputs, indicator, masked_means
from tether.objectives.policy_gradient import policy_metrics, reinforce_loss
from tether.objectives.ratios import token_log_ratio
from tether.objectives.registry import Preset, register

ESS_EPS = 1e-8
"""Added to the ESS denominator (FeynRL ``calculate_ess``)."""
KL_EXP_CLAMP = 10.0
"""The exponent of the k3 estimator is clamped to [-10, 10] (FeynRL ``compute_kl_distance``)."""
TRUST_REGION_MIN = 1e-6
"""P4O skips its trust-region term when ``1 - ESS_mix`` is at most this."""


def ess_sums(weights_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Additive sufficient statistics ``[sum m w, sum m w^2, sum m]`` in float64, detached.

    Sum these over micro-batches / ranks, then call ``ess_from_sums``.
    """
    m = mask_BT.bool()
    w = torch.where(m, weights_BT.detach().to(torch.float64), 0.0)
    flat = w.reshape(-1)
    return torch.stack([w.sum(), torch.dot(flat, flat), m.count_nonzero().to(torch.float64)])


def ess_from_sums(sums: Tensor) -> Tensor:
    """``ESS = S1^2 / (n S2 + 1e-8)``; ``1.0`` when ``n = 0`` or the result is not finite. 0-dim float64."""
    s1, s2, n = sums.to(torch.float64).unbind()
    ess = s1 * s1 / (n * s2 + ESS_EPS)
    ok = (n > 0) & torch.isfinite(ess)
    return torch.where(ok, ess, torch.ones_like(ess))


def effective_sample_size(weights_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Normalised effective sample size of importance weights over the ``n`` valid tokens.

    ``ESS = (sum_t m_t w_t)^2 / (n sum_t m_t w_t^2 + 1e-8)`` in float64, in ``[1/n, 1]`` for
    non-negative weights; ``1.0`` if ``n = 0`` or non-finite. No gradient (FeynRL ``calculate_ess``;
    Kish 1965). Returned as a 0-dim float64 tensor (no host sync).
    """
    return ess_from_sums(ess_sums(weights_BT, mask_BT))


def kl_k3(logp_BT: Tensor, logp_anchor_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Per-token k3 estimate of ``KL(pi || anchor)``: ``z + exp(clamp(-z, -10, 10)) - 1``, ``z = log pi - log anchor``.

    0 on masked positions. Gradient w.r.t. ``log pi``: ``1 - exp(-z)`` (``1`` where the exponent is clamped).
    """
    valid = mask_BT.bool()
    anchor = logp_anchor_BT
    if anchor.requires_grad or logp_BT.shape != valid.shape:
        z = torch.where(valid, logp_BT - anchor, torch.zeros_like(logp_BT))
        return z + torch.exp(torch.clamp(-z, -KL_EXP_CLAMP, KL_EXP_CLAMP)) - 1.0
    if not (torch.is_grad_enabled() and logp_BT.requires_grad):
        with torch.no_grad():  # same value, intermediates updated in place
            z = torch.where(valid, logp_BT - anchor, 0.0)
            return torch.clamp(-z, -KL_EXP_CLAMP, KL_EXP_CLAMP).exp_().add_(z).sub_(1.0)

    def value_and_grad(x: Tensor) -> tuple[Tensor, Tensor]:
        # d k3 / d log pi = m (1 - exp(-z) 1[|z| <= 10]) (the clamp passes the gradient on [-10, 10])
        z = torch.where(valid, x - anchor, 0.0)
        neg_z = -z
        e = torch.clamp(neg_z, -KL_EXP_CLAMP, KL_EXP_CLAMP).exp_()
        passes = indicator(torch.le, neg_z.abs_(), KL_EXP_CLAMP).mul_(e)  # exact: e <= exp(10) is finite
        return e.add_(z).sub_(1.0), torch.where(valid, passes.neg_().add_(1.0), 0.0)

    return elementwise_loss(logp_BT, value_and_grad)[0]


def _as_ess(value: float | Tensor | None, weights_BT: Tensor, mask_BT: Tensor) -> Tensor:
    if value is None:
        return effective_sample_size(weights_BT, mask_BT)
    return torch.as_tensor(value, dtype=torch.float64, device=weights_BT.device).detach()


def _outside(w_BT: Tensor, clip_low: float, clip_high: float) -> Tensor:
    """``1[w < 1 - clip_low or w > 1 + clip_high]`` as 0./1. (the ``clipfrac`` diagnostic)."""
    return torch.maximum(indicator(torch.lt, w_BT, 1.0 - clip_low), indicator(torch.gt, w_BT, 1.0 + clip_high))


def p3o_loss(
    logp_theta_BT: Tensor,
    logp_old_BT: Tensor,
    advantages_BT: Tensor,
    mask_BT: Tensor,
    *,
    ess: float | Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
) -> tuple[Tensor, dict[str, Tensor]]:
    """P3O per-token loss (FeynRL ``algs/P3O/p3o.py::compute_policy_loss``; arXiv 2605.12380).

    ``w_t = exp(delta_t)`` with ``delta_t = clamp(log pi_theta - log pi_old, -20, 20)`` (0 on pads);
    ``ESS = effective_sample_size(w)`` unless given;
    ``l_t = -sg(clamp(w_t, 0, ESS)) A_t log pi_theta(y_t) + (1 - ESS) KL_k3(pi_theta || pi_old)_t``.
    Gradient: ``-min(w_t, ESS) A_t grad log pi_theta + (1 - ESS)(1 - 1/w_t) grad log pi_theta``.
    ``clip_low`` / ``clip_high`` only feed the ``p3o/clipfrac`` diagnostic.
    """
    loss, _, _, metrics = _p3o(logp_theta_BT, logp_old_BT, advantages_BT, mask_BT, ess=ess, clip_low=clip_low,
                               clip_high=clip_high)
    return loss, metrics


def _p3o(
    logp_theta_BT: Tensor,
    logp_old_BT: Tensor,
    advantages_BT: Tensor,
    mask_BT: Tensor,
    *,
    ess: float | Tensor | None,
    clip_low: float,
    clip_high: float,
) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """``p3o_loss`` that also returns the detached token log-ratio and ratio ``w`` (for metrics)."""
    with torch.no_grad():
        lr = token_log_ratio(logp_theta_BT.detach(), logp_old_BT, mask_BT)
        w = torch.exp(lr)
    ess_t = _as_ess(ess, w, mask_BT)
    weight = torch.clamp(w, min=0.0, max=ess_t.to(w.dtype))
    kl = kl_k3(logp_theta_BT, logp_old_BT, mask_BT)
    coef = (1.0 - ess_t).to(logp_theta_BT.dtype)
    loss = reinforce_loss(logp_theta_BT, advantages_BT, weight) + coef * kl
    metrics = {
        "p3o/ess": ess_t,
        **masked_means(
            {"p3o/kl_behavioral": kl.detach(), "p3o/weight_mean": weight, "p3o/clipfrac": _outside(w, clip_low, clip_high)},
            mask_BT,
        ),
    }
    return loss, lr, w, metrics


def mixture_log_prob(logp_old_BT: Tensor, logp_prox_BT: Tensor, ess_b: Tensor, ess_p: Tensor) -> Tensor:
    """P4O anchor ``log pi_mix = logsumexp(log a_b + log pi_old, log a_p + log pi_prox) - log(a_b + a_p)``.

    ``a_b = 1 - ESS_b``, ``a_p = 1 - ESS_p`` (clamped at 0). Falls back to ``log pi_old`` when both
    weights are 0 (the trust-region term is then off anyway). Detached.
    """
    a_b = (1.0 - ess_b).clamp(min=0.0).to(logp_old_BT.dtype)
    a_p = (1.0 - ess_p).clamp(min=0.0).to(logp_old_BT.dtype)
    total = a_b + a_p
    safe = total > 0
    la_b = torch.log(torch.where(safe, a_b, torch.ones_like(a_b)))
    la_p = torch.log(torch.where(safe, a_p, torch.ones_like(a_p)))
    mix = torch.logaddexp(la_b + logp_old_BT.detach(), la_p + logp_prox_BT.detach())
    mix.sub_(torch.log(torch.where(safe, total, torch.full_like(total, 2.0))))
    return torch.where(safe, mix, logp_old_BT.detach())


def p4o_loss(
    logp_theta_BT: Tensor,
    logp_old_BT: Tensor,
    logp_prox_BT: Tensor,
    advantages_BT: Tensor,
    mask_BT: Tensor,
    *,
    ess_b: float | Tensor | None = None,
    ess_p: float | Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
) -> tuple[Tensor, dict[str, Tensor]]:
    """P4O per-token loss (FeynRL ``algs/P4O/p4o.py``).

    ``w_b = pi_theta / pi_old``, ``w_p = pi_theta / pi_prox`` (detached, log-ratios clamped to +-20);
    ``ESS_b``, ``ESS_p`` their effective sample sizes (unless given), ``ESS_mix = min(ESS_b, ESS_p)``;
    ``l_t = -sg(clamp(w_b, 0, ESS_mix)) A_t log pi_theta(y_t) + c KL_k3(pi_theta || pi_mix)_t`` with
    ``c = 1 - ESS_mix`` if ``1 - ESS_mix > 1e-6`` else ``0``, and ``pi_mix`` from ``mixture_log_prob``.
    """
    loss, _, _, metrics = _p4o(
        logp_theta_BT, logp_old_BT, logp_prox_BT, advantages_BT, mask_BT, ess_b=ess_b, ess_p=ess_p,
        clip_low=clip_low, clip_high=clip_high,
    )
    return loss, metrics


def _p4o(
    logp_theta_BT: Tensor,
    logp_old_BT: Tensor,
    logp_prox_BT: Tensor,
    advantages_BT: Tensor,
    mask_BT: Tensor,
    *,
    ess_b: float | Tensor | None,
    ess_p: float | Tensor | None,
    clip_low: float,
    clip_high: float,
) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """``p4o_loss`` that also returns the detached token log-ratio and ratio ``w_b`` vs pi_old."""
    with torch.no_grad():
        lr_b = token_log_ratio(logp_theta_BT.detach(), logp_old_BT, mask_BT)
        w_b = torch.exp(lr_b)
        w_p = torch.exp(token_log_ratio(logp_theta_BT.detach(), logp_prox_BT, mask_BT))
    eb = _as_ess(ess_b, w_b, mask_BT)
    ep = _as_ess(ess_p, w_p, mask_BT)
    emix = torch.minimum(eb, ep)
    weight = torch.clamp(w_b, min=0.0, max=emix.to(w_b.dtype))
    logp_mix = mixture_log_prob(logp_old_BT, logp_prox_BT, eb, ep)
    kl_mix = kl_k3(logp_theta_BT, logp_mix, mask_BT)
    gap = 1.0 - emix
    coef = torch.where(gap > TRUST_REGION_MIN, gap, torch.zeros_like(gap)).to(logp_theta_BT.dtype)
    loss = reinforce_loss(logp_theta_BT, advantages_BT, weight) + coef * kl_mix
    a_b = (1.0 - eb).clamp(min=0.0)
    a_p = (1.0 - ep).clamp(min=0.0)
    total = a_b + a_p
    with torch.no_grad():
        th = logp_theta_BT.detach()
        means = masked_means(
            {
                "p4o/kl_b": kl_k3(th, logp_old_BT, mask_BT),
                "p4o/kl_prox": kl_k3(th, logp_prox_BT, mask_BT),
                "p4o/kl_mix": kl_mix.detach(),
                "p4o/weight_mean": weight,
                "p4o/clipfrac": _outside(w_b, clip_low, clip_high),
            },
            mask_BT,
        )
    metrics = {
        "p4o/ess_b": eb,
        "p4o/ess_prox": ep,
        "p4o/ess_mix": emix,
        "p4o/kl_b": means["p4o/kl_b"],
        "p4o/kl_prox": means["p4o/kl_prox"],
        "p4o/kl_mix": means["p4o/kl_mix"],
        "p4o/mix_weight_b": torch.where(total > 0, a_b / torch.where(total > 0, total, 1.0), 0.5),
        "p4o/weight_mean": means["p4o/weight_mean"],
        "p4o/clipfrac": means["p4o/clipfrac"],
    }
    return loss, lr_b, w_b, metrics


def _agg(inputs: LossInputs, loss_BT: Tensor, agg: str) -> Tensor:
    return aggregate(
        loss_BT, inputs.mask_BT, agg, num_tokens=inputs.num_tokens, num_seqs=inputs.num_seqs, horizon=inputs.horizon
    )


def p3o(
    inputs: LossInputs, *, agg: str, ess: float | Tensor | None, clip_low: float, clip_high: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """P3O preset: ``p3o_loss`` reduced over the global token count (FeynRL ``normalize_loss``).

    ``ess=None`` computes ESS on the tensors given (FeynRL, per micro-batch); pass the step's global
    ESS (``ess_from_sums`` of the summed ``ess_sums``) for a loss that is exact under micro-batching.
    """
    loss_BT, lr, w, metrics = _p3o(
        inputs.logp_theta_BT, inputs.logp_old_BT, inputs.advantages_BT, inputs.mask_BT,
        ess=ess, clip_low=clip_low, clip_high=clip_high,
    )
    return _agg(inputs, loss_BT, agg), {**metrics, **policy_metrics(inputs, log_ratio_BT=lr, ratio_BT=w)}


def p4o(
    inputs: LossInputs,
    *,
    agg: str,
    ess_b: float | Tensor | None,
    ess_p: float | Tensor | None,
    clip_low: float,
    clip_high: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """P4O preset: ``p4o_loss`` with the proximal snapshot ``logp_prox_BT``.

    ``ess_b`` / ``ess_p`` as P3O's ``ess``: ``None`` computes them on the tensors given; pass global
    values for a loss that is exact under micro-batching.
    """
    inputs.require("logp_prox_BT", preset="p4o")
    loss_BT, lr, w, metrics = _p4o(
        inputs.logp_theta_BT, inputs.logp_old_BT, inputs.logp_prox_BT, inputs.advantages_BT, inputs.mask_BT,
        ess_b=ess_b, ess_p=ess_p, clip_low=clip_low, clip_high=clip_high,
    )
    return _agg(inputs, loss_BT, agg), {**metrics, **policy_metrics(inputs, log_ratio_BT=lr, ratio_BT=w)}


def _step_ratio_weights(logp_theta_BT: Tensor, logp_anchor_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """``w = exp(clamp(log pi_theta - log anchor))`` detached: the weights whose ESS P3O / P4O read."""
    with torch.no_grad():
        return torch.exp(token_log_ratio(logp_theta_BT.detach(), logp_anchor_BT, mask_BT))


def p3o_batch_stats(inputs: LossInputs, args) -> dict[str, Tensor]:
    """P3O's whole-step statistic: ``{"ess": ESS(pi_theta / pi_old)}`` over every token of the step
    (nothing when the user fixed ``ess``)."""
    if args.get("ess") is not None:
        return {}
    w = _step_ratio_weights(inputs.logp_theta_BT, inputs.logp_old_BT, inputs.mask_BT)
    return {"ess": effective_sample_size(w, inputs.mask_BT)}


def p4o_batch_stats(inputs: LossInputs, args) -> dict[str, Tensor]:
    """P4O's whole-step statistics ``ess_b = ESS(pi_theta / pi_old)``, ``ess_p = ESS(pi_theta / pi_prox)``
    (each only when not fixed by the user)."""
    out = {}
    if args.get("ess_b") is None:
        w = _step_ratio_weights(inputs.logp_theta_BT, inputs.logp_old_BT, inputs.mask_BT)
        out["ess_b"] = effective_sample_size(w, inputs.mask_BT)
    if args.get("ess_p") is None:
        inputs.require("logp_prox_BT", preset="p4o")
        w = _step_ratio_weights(inputs.logp_theta_BT, inputs.logp_prox_BT, inputs.mask_BT)
        out["ess_p"] = effective_sample_size(w, inputs.mask_BT)
    return out


register(Preset(
    name="p3o",
    description="P3O (Trust the Batch): weight sg(min(r, ESS)) plus (1-ESS) k3 trust region; no clip constants.",
    fn=p3o,
    defaults={"agg": "token-mean", "ess": None, "clip_low": 0.2, "clip_high": 0.2},
    advantage="grpo",
    batch_stats=p3o_batch_stats,
    source=(
        "Fakoor et al. 2026, arXiv 2605.12380 (Trust the Batch); FeynRL algs/P3O/p3o.py "
        "compute_policy_loss, calculate_ess; algs/RL/common.py compute_kl_distance"
    ),
    equation=(
        "ESS = (sum m w)^2/(n sum m w^2 + 1e-8), w = pi/pi_old; "
        "l_t = -sg(clamp(w_t, 0, ESS)) A_t log pi_t + (1-ESS) KL_k3(pi||pi_old)_t; / N_tok"
    ),
))
register(Preset(
    name="p4o",
    description="P4O: P3O with ESS_mix = min(ESS_old, ESS_prox) and a k3 trust region to a mixture anchor.",
    fn=p4o,
    defaults={"agg": "token-mean", "ess_b": None, "ess_p": None, "clip_low": 0.2, "clip_high": 0.2},
    advantage="grpo",
    source="FeynRL algs/P4O/p4o.py (extension of P3O, arXiv 2605.12380)",
    requires=("logp_prox_BT",),
    batch_stats=p4o_batch_stats,
    equation=(
        "ESS_mix = min(ESS(pi/pi_old), ESS(pi/pi_prox)); l_t = -sg(clamp(w_b, 0, ESS_mix)) A log pi_t "
        "+ (1-ESS_mix) KL_k3(pi||pi_mix)_t [0 if 1-ESS_mix <= 1e-6]; "
        "pi_mix = (a_b pi_old + a_p pi_prox)/(a_b + a_p), a = 1 - ESS"
    ),
))
