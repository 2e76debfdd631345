"""Distillation and supervised presets: on-policy distillation (sampled token, full vocabulary,
top-k), plain SFT, and PEAR importance-weighted SFT.

The algorithms in ``tether.distill`` fill ``LossInputs.logp_teacher_BT`` / ``logp_teacher_BTV`` /
``logp_theta_BTV`` (or, for PEAR, the stored behaviour log-probs ``logp_mu_BT``); these presets only
combine tensors. The divergences themselves are in :mod:`tether.objectives.divergences`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tether.objectives.aggregation import aggregate
from tether.objectives.divergences import (
    Divergence,
    Support,
    reverse_kl_pg,
    sampled_coefficient,
    supported_divergence,
    topk_buckets,
)
from tether.objectives.inputs import LossInputs, masked_mean
from tether.objectives.ratios import LOG_RATIO_CLAMP, token_log_ratio
from tether.objectives.registry import Preset, register


def _agg(inputs: LossInputs, loss_BT: Tensor, agg: str) -> Tensor:
    return aggregate(loss_BT, inputs.mask_BT, agg, num_tokens=inputs.num_tokens, num_seqs=inputs.num_seqs,
                     horizon=inputs.horizon)


def _masked(x_BT: Tensor, mask_BT: Tensor) -> Tensor:
    return torch.where(mask_BT.bool(), x_BT, torch.zeros_like(x_BT))


def opd_sampled(inputs: LossInputs, *, agg: str, divergence: str, kl_coef: float, rl_coef: float
                ) -> tuple[Tensor, dict[str, Tensor]]:
    """On-policy distillation at the sampled token, optionally mixed with the RL advantage.

    ``l_t = -(rl_coef A_t - kl_coef c_t) r_t`` with ``r_t = pi_theta(y_t) / pi_old(y_t)`` and the
    detached coefficient ``c_t = sampled_coefficient(log pi_old(y_t), log pi_T(y_t))`` (for the
    reverse KL ``c_t = log pi_old - log pi_T``, so ``-c_t`` is the per-token OPD "advantage"). At
    ``theta = old`` the gradient is ``-(rl_coef A_t - kl_coef c_t) grad log pi_theta(y_t)``.
    Metrics: ``opd/reverse_kl_sampled`` (mean ``log pi_old - log pi_T`` at sampled tokens, an unbiased
    per-token estimate of KL(student || teacher)), ``opd/coef_mean``.
    """
    m = inputs.mask_BT
    c = _masked(sampled_coefficient(inputs.logp_old_BT, inputs.logp_teacher_BT, divergence), m)
    ratio = torch.exp(token_log_ratio(inputs.logp_theta_BT, inputs.logp_old_BT, m))
    loss_BT = _masked(-(rl_coef * inputs.advantages_BT.detach() - kl_coef * c) * ratio, m)
    metrics = {
        "opd/reverse_kl_sampled": masked_mean((inputs.logp_old_BT - inputs.logp_teacher_BT).detach(), m),
        "opd/coef_mean": masked_mean(c, m),
    }
    return _agg(inputs, loss_BT, agg), metrics


def opd_vocab(inputs: LossInputs, *, agg: str, divergence: str, support: str, k: int, beta: float, tail: bool,
              stopgrad: bool, rl_coef: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Distillation over the vocabulary (full or top-k with a tail bucket) at every student prefix.

    ``l_t = D(pi_T(.|s_t) || pi_theta(.|s_t)) - rl_coef A_t r_t``. With ``stopgrad`` (reverse KL only)
    the divergence term is :func:`~tether.objectives.divergences.reverse_kl_pg` on the chosen support.
    Metrics: ``distill/divergence`` (the divergence term, token mean), ``distill/student_entropy``.
    """
    s_BTV, t_BTV = inputs.logp_theta_BTV, inputs.logp_teacher_BTV.detach()
    if s_BTV.shape[-1] != t_BTV.shape[-1]:
        raise ValueError(f"teacher vocabulary size {t_BTV.shape[-1]} differs from the student's {s_BTV.shape[-1]}")
    m = inputs.mask_BT
    if stopgrad:
        if Divergence.parse(divergence) is not Divergence.REVERSE_KL:
            raise ValueError("stopgrad=True is defined for divergence 'reverse_kl' only")
        sup = Support.parse(support)
        if sup is Support.SAMPLED:
            raise ValueError("support 'sampled' belongs to the 'opd' preset")
        if sup is not Support.FULL:
            source = "teacher" if sup is Support.TOPK_TEACHER else "student"
            s_BTV, t_BTV = topk_buckets(s_BTV, t_BTV, k=k, source=source, tail=tail)
        d_BT = reverse_kl_pg(s_BTV, t_BTV)
    else:
        d_BT = supported_divergence(s_BTV, t_BTV, divergence, support=support, k=k, beta=beta, tail=tail)
    d_BT = _masked(d_BT, m)
    loss_BT = d_BT
    if rl_coef:
        ratio = torch.exp(token_log_ratio(inputs.logp_theta_BT, inputs.logp_old_BT, m))
        loss_BT = loss_BT - _masked(rl_coef * inputs.advantages_BT.detach() * ratio, m)
    p = inputs.logp_theta_BTV.detach().exp()
    ent = -(p * inputs.logp_theta_BTV.detach()).sum(-1)
    metrics = {"distill/divergence": masked_mean(d_BT.detach(), m), "distill/student_entropy": masked_mean(ent, m)}
    return _agg(inputs, loss_BT, agg), metrics


def sft_loss(inputs: LossInputs, *, agg: str) -> tuple[Tensor, dict[str, Tensor]]:
    """Supervised fine-tuning: ``l_t = -log pi_theta(y_t | s_t)`` on the loss mask (teacher-forced).

    Metric: ``sft/nll`` (token-mean negative log-likelihood).
    """
    loss_BT = _masked(-inputs.logp_theta_BT, inputs.mask_BT)
    return _agg(inputs, loss_BT, agg), {"sft/nll": masked_mean(loss_BT.detach(), inputs.mask_BT)}


def _discounted_suffix_sum(x_BN: Tensor, gamma: float) -> Tensor:
    """``s_n = sum_{j >= n} gamma^(j - n) x_j`` along the last axis.

    ``gamma = 1`` (the default): a reverse cumulative sum, O(N). Otherwise the product with the
    upper-triangular discount matrix ``D[n, j] = gamma^(j - n) [j >= n]``, O(N^2) (a closed form
    through ``gamma^-n`` would overflow for long sequences)."""
    if gamma == 1.0:
        return x_BN.flip(-1).cumsum(-1).flip(-1)
    pos = torch.arange(x_BN.shape[-1], device=x_BN.device)
    diff = (pos[None, :] - pos[:, None]).to(x_BN.dtype)  # [n, j] = j - n
    disc_NN = torch.where(diff >= 0, torch.as_tensor(gamma, dtype=x_BN.dtype) ** diff.clamp(min=0),
                          torch.zeros_like(diff))
    return x_BN @ disc_NN.T


def pear_log_weights(logp_theta_BT: Tensor, logp_mu_BT: Tensor, mask_BT: Tensor, *, mode: str, gamma: float = 1.0,
                     block: int = 4) -> Tensor:
    """PEAR's log importance weights (detached), 0 off the mask.

    ``log rho_t = log pi_theta(y_t) - log pi_beta(y_t)`` (detached, clamped to [-20, 20]).

    - ``sequence``: ``log w_t = sum_j log rho_j`` for every token of the sequence.
    - ``token``: discounted suffix ``log w_t = sum_{j >= t} gamma^(j - t) log rho_j``.
    - ``block``: completion tokens grouped into consecutive blocks of ``block`` loss tokens;
      ``L_b = sum_{t in b} log rho_t``; ``log w_t = sum_{b' >= b(t)} gamma^(b' - b(t)) L_b'``.

    Source: PEAR, arXiv 2602.01058 (methods.md §(a)8); the discount form is INFERRED from
    "discounted suffix importance ratios".
    """
    m = mask_BT.bool()
    lr = _masked(token_log_ratio(logp_theta_BT.detach(), logp_mu_BT.detach(), m), m)
    T = lr.shape[-1]
    if mode == "sequence":
        return _masked(lr.sum(-1, keepdim=True).expand_as(lr), m)
    if mode == "token":
        return _masked(_discounted_suffix_sum(lr, gamma), m)
    if mode == "block":
        if block < 1:
            raise ValueError(f"pear: block must be >= 1, got {block}")
        idx_BT = (m.long().cumsum(-1) - 1).clamp(min=0) // block
        n_blocks = T // block + 1
        blocks_BN = torch.zeros(lr.shape[0], n_blocks, dtype=lr.dtype, device=lr.device).scatter_add_(-1, idx_BT, lr)
        suffix_BN = _discounted_suffix_sum(blocks_BN, gamma)
        return _masked(suffix_BN.gather(-1, idx_BT), m)
    raise ValueError(f"pear: unknown weighting mode '{mode}'; valid: sequence, token, block")


def _pear_weights(inputs: LossInputs, *, mode: str, gamma: float, block: int, clip_max: float) -> tuple[Tensor, Tensor]:
    """``(raw, w)``: PEAR's unclipped weights ``exp(log w_t)`` and the clipped ones ``min(raw, clip_max)``, 0 off
    the mask."""
    m = inputs.mask_BT
    log_w = pear_log_weights(inputs.logp_theta_BT, inputs.logp_mu_BT, m, mode=mode, gamma=gamma, block=block)
    raw = torch.exp(log_w.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    return raw, _masked(raw.clamp(max=clip_max), m)


def pear_batch_stats(inputs: LossInputs, args) -> dict[str, Tensor]:
    """PEAR's whole-step statistic: the masked mean of the clipped weights over every loss token of the step,
    ``{"weight_mean": sum m w / sum m}`` (only with ``normalize`` and when not fixed by the user)."""
    if not args["normalize"] or args.get("weight_mean") is not None:
        return {}
    _, w = _pear_weights(inputs, mode=args["mode"], gamma=args["gamma"], block=args["block"], clip_max=args["clip_max"])
    return {"weight_mean": masked_mean(w, inputs.mask_BT)}


def pear_loss(inputs: LossInputs, *, agg: str, mode: str, gamma: float, block: int, clip_max: float,
              normalize: bool, weight_mean: float | Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """PEAR importance-weighted SFT: ``l_t = -w_t log pi_theta(y_t)``, ``w_t = sg(weight)``.

    ``w_t = min(exp(log w_t), clip_max)`` from :func:`pear_log_weights` (behaviour log-probs in
    ``logp_mu_BT``); with ``normalize`` the clipped weights are divided by their masked mean over the
    batch (self-normalised IS; INFERRED, methods.md: "weights should be clipped or normalised").
    ``weight_mean``: that mean over the whole optimiser step (``pear_batch_stats``; the trainer passes it to
    every micro-batch so the split does not change the loss); ``None`` computes it from the tensors given.
    Metrics: ``pear/weight_mean`` (before normalising), ``pear/clip_frac``, ``pear/ess`` =
    ``(sum w)^2 / (N sum w^2)`` over loss tokens, ``sft/nll``.
    """
    m = inputs.mask_BT
    raw, w = _pear_weights(inputs, mode=mode, gamma=gamma, block=block, clip_max=clip_max)
    weight_mean = masked_mean(w, m) if weight_mean is None else torch.as_tensor(weight_mean, dtype=w.dtype)
    if normalize:
        w = w / weight_mean.clamp(min=torch.finfo(w.dtype).tiny)
    nll = _masked(-inputs.logp_theta_BT, m)
    mf = m.to(w.dtype)
    metrics = {
        "pear/weight_mean": weight_mean,
        "pear/clip_frac": masked_mean((raw > clip_max).to(w.dtype), m),
        "pear/ess": (w * mf).sum() ** 2 / (mf.sum().clamp(min=1) * (w * w * mf).sum().clamp(min=1e-30)),
        "sft/nll": masked_mean(nll.detach(), m),
    }
    return _agg(inputs, w.detach() * nll, agg), metrics


_OPD_SOURCE = ("OPD survey arXiv 2604.00626 (methods.md §(b)1); siyan-zhao/OPSD opsd_trainer.py "
               "(use_tinker_loss); tinker-cookbook on-policy distillation")

register(Preset(
    name="opd",
    description=("On-policy distillation, sampled-token form: per-token advantage -(log pi_old - log pi_T) "
                 "(reverse KL), optionally plus rl_coef x the RL advantage."),
    fn=opd_sampled,
    defaults={"agg": "token-mean", "divergence": "reverse_kl", "kl_coef": 1.0, "rl_coef": 0.0},
    advantage="grpo",
    source=_OPD_SOURCE,
    requires=("logp_teacher_BT",),
    equation="l_t = -(rl_coef A_t - kl_coef sg(log pi_old(y_t) - log pi_T(y_t))) r_t",
))

_VOCAB_DEFAULTS = {"agg": "token-mean", "support": "full", "k": 16, "beta": 0.5, "tail": True, "stopgrad": False,
                   "rl_coef": 0.0}
for _name, _div, _desc, _eq, _src in [
    ("distill_reverse_kl", "reverse_kl", "Reverse KL(pi_theta || pi_T) over the vocabulary (or top-k + tail bucket) "
     "at student prefixes (mode-seeking OPD).", "l_t = sum_v pi_theta(v) (log pi_theta(v) - log pi_T(v))",
     _OPD_SOURCE),
    ("distill_forward_kl", "forward_kl", "Forward KL(pi_T || pi_theta) over the vocabulary (or top-k + tail) at "
     "student prefixes (mode-covering; CaOPD's default).", "l_t = sum_v pi_T(v) (log pi_T(v) - log pi_theta(v))",
     "CaOPD (SalesforceAIResearch/CaOPD _compute_loss, alpha=0); OPD survey"),
    ("distill_jsd", "jsd", "Generalised JSD_beta between teacher and student at student prefixes (GKD / OPSD).",
     "M = beta pi_T + (1-beta) pi_theta ; l_t = beta KL(pi_T||M) + (1-beta) KL(pi_theta||M)",
     "siyan-zhao/OPSD generalized_jsd_loss (beta=0.5); trl GKD"),
    ("distill_tv", "tv", "Total variation between teacher and student at student prefixes.",
     "l_t = 1/2 sum_v |pi_T(v) - pi_theta(v)|", "OPD survey f(u) = |u-1|/2"),
]:
    register(Preset(
        name=_name, description=_desc, fn=opd_vocab, defaults={**_VOCAB_DEFAULTS, "divergence": _div},
        advantage="grpo", source=_src, requires=("logp_theta_BTV", "logp_teacher_BTV"),
        equation=_eq + " - rl_coef A_t r_t (support: full | topk_teacher | topk_student, tail bucket)",
    ))

register(Preset(
    name="sft",
    description="Supervised fine-tuning: negative log-likelihood of the given (e.g. teacher-sampled) tokens.",
    fn=sft_loss,
    defaults={"agg": "token-mean"},
    advantage="grpo",
    source="standard maximum likelihood; the PEAR paper's 'canonical SFT' baseline",
    equation="l_t = -log pi_theta(y_t | s_t)",
))
register(Preset(
    name="pear",
    description=("PEAR: SFT on behaviour-policy data reweighted by clipped importance ratios pi_theta/pi_beta "
                 "(sequence, discounted token suffix, or block suffix)."),
    fn=pear_loss,
    defaults={"agg": "token-mean", "mode": "token", "gamma": 1.0, "block": 4, "clip_max": 5.0, "normalize": True,
              "weight_mean": None},
    batch_stats=pear_batch_stats,
    advantage="grpo",
    source="PEAR, arXiv 2602.01058 (methods.md §(a)8); discount and clipping INFERRED",
    requires=("logp_mu_BT",),
    equation="l_t = -sg(min(exp(sum_{j>=t} gamma^(j-t) log(pi_theta(y_j)/pi_beta(y_j))), C)) log pi_theta(y_t)",
))
