"""Exact (or Monte Carlo) moments of gradient estimators at ``theta = theta_old`` under ``mu``.

Every estimator studied here is linear in the per-token scores: for one sequence ``y``,
``g_hat(y) = sum_t c_t(y) grad log pi_theta(y_t | y_<t)`` with coefficients ``c_NT`` that depend on
``theta`` only through values. For a preset, ``c_t(y) = -d loss(y) / d log pi_theta(y_t)`` is read off
by autograd w.r.t. the ``[N, T]`` log-prob tensor of the whole enumerated batch: with every mask
one and default normalisers, the batch loss of a per-sequence separable preset is
``(1/N) sum_y loss(y)``, so ``N`` times its gradient is every sequence's own coefficient at once.

With tabular logits, ``grad_{theta[p, v]} log pi(y_t | .) = 1[v = y_t] - pi(v | p)`` and the prefixes
of one sequence are distinct rows, so ``||g_hat(y)||^2 = sum_t c_t^2 (1 - 2 pi(y_t) + ||pi(.|p_t)||^2)``
exactly; ``E_mu[g_hat] = grad_theta sum_y mu(y) sum_t c_t(y) log pi_theta(y_t)``;
``Var = sum_y mu(y) ||g_hat(y)||^2 - ||E g_hat||^2`` (trace of the per-sample covariance).

Token-normalised losses (``token-mean``, ``seq-mean-token-mean``, ``seq-mean-token-sum-norm``) carry a
``1/T`` factor; coefficients are multiplied back by ``T`` so that on-policy REINFORCE estimates
``grad J`` itself (cosines do not depend on this).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from tether.lab.policy import Space, seq_probs, token_logp
from tether.objectives import get_preset
from tether.objectives.aggregation import AggMode
from tether.objectives.inputs import LossInputs
from tether.objectives.ratios import cumulative_log_ratio, sequence_log_ratio, token_log_ratio

RAW_ESTIMATORS = ("on_policy", "token_is", "sequence_is", "cumulative_is")
NON_SEPARABLE = frozenset({"p3o", "p4o"})
"""Presets known to couple sequences through a batch statistic (the ESS): Monte Carlo only. Any other
preset is checked by ``is_separable`` before its exact moments are used."""
UNSUPPORTED_INPUTS = ("expert_B", "logp_expert_old_BT", "logp_ref_BT", "logp_teacher_BT", "logp_theta_BTV",
                      "logp_teacher_BTV")
SUPERVISED = frozenset({"sft", "pear"})
"""Presets that maximise the likelihood of given data, not E[R]: no policy gradient to measure."""
MU_FLOOR = -1e4
"""log mu of tokens mu never samples (truncation) is floored here; such sequences get weight 0."""


@dataclass(frozen=True)
class Moments:
    bias: float
    """``||E g_hat - grad J|| / ||grad J||``."""
    variance: float
    """``E ||g_hat - E g_hat||^2`` per sequence."""
    mse: float
    """``||E g_hat - grad J||^2 + variance`` (absolute)."""
    cosine: float
    bias_se: float = 0.0
    """Monte Carlo standard error of ``bias`` (0 when exact)."""
    exact: bool = True
    dropped: float = 0.0
    """``sum_y mu(y) 1[c_t(y) = 0 for every t]``: the ``mu``-mass of sequences the estimator drops whole (a
    sequence mask's rejection rate; exact moments only, 0 under Monte Carlo)."""

    def as_dict(self) -> dict[str, float | bool]:
        return asdict(self)


def agg_scale(agg: str, horizon: int) -> float:
    """The factor that undoes a loss's ``1/T`` token normaliser (all masks one, length ``T``)."""
    return 1.0 if AggMode.parse(agg) is AggMode.SEQ_MEAN_TOKEN_SUM else float(horizon)


def raw_coefficients(name: str, logp_pi_NT: Tensor, logp_mu_NT: Tensor, adv_N: Tensor) -> Tensor:
    """``c_NT`` of the raw estimators (``A = R - J``, ``r_t = pi / mu`` per token):

    ``on_policy``: ``c_t = A``; ``token_is``: ``c_t = r_t A``; ``sequence_is``: ``c_t = (prod_j r_j) A``;
    ``cumulative_is``: ``c_t = (prod_{j<=t} r_j) A`` (CTPO's prefix ratio, ``ratios.cumulative_log_ratio``).
    """
    mask = torch.ones_like(logp_pi_NT)
    A = adv_N[:, None].expand_as(logp_pi_NT)
    mu = logp_mu_NT.clamp(min=MU_FLOOR)
    if name == "on_policy":
        return A.clone()
    if name == "token_is":
        return torch.exp(token_log_ratio(logp_pi_NT, mu, mask)) * A
    if name == "sequence_is":
        lr = sequence_log_ratio(token_log_ratio(logp_pi_NT, mu, mask), mask)
        return torch.exp(lr)[:, None] * A
    if name == "cumulative_is":
        return torch.exp(cumulative_log_ratio(logp_pi_NT, mu, mask, max_log=float("inf"))) * A
    raise ValueError(f"lab: unknown raw estimator '{name}'; valid: {', '.join(RAW_ESTIMATORS)}")


def skip_reason(name: str) -> str | None:
    """Why a preset cannot be measured here (it needs inputs the lab has no model of), else None."""
    p = get_preset(name)
    if name in SUPERVISED:
        return "supervised (likelihood of given data), not an estimator of grad E[R]"
    missing = [r for r in p.requires if r in UNSUPPORTED_INPUTS]
    return f"needs {', '.join(missing)}" if missing else None


def preset_inputs(logp_theta_BT: Tensor, logp_pi_BT: Tensor, logp_mu_BT: Tensor, adv_B: Tensor, *, old: str) -> LossInputs:
    """LossInputs at ``theta = theta_old``: ``logp_old = log pi`` (``old='pi'``, the trainer recomputes)
    or ``log mu`` (``old='mu'``, the engine's log-probs are used as old); ``logp_prox = logp_old``."""
    if old not in ("pi", "mu"):
        raise ValueError(f"lab: old must be 'pi' or 'mu', got '{old}'")
    mu = logp_mu_BT.clamp(min=MU_FLOOR)
    logp_old = logp_pi_BT if old == "pi" else mu
    return LossInputs(
        logp_theta_BT=logp_theta_BT,
        logp_old_BT=logp_old,
        advantages_BT=adv_B[:, None].expand_as(logp_pi_BT),
        mask_BT=torch.ones_like(logp_pi_BT),
        logp_mu_BT=mu,
        logp_prox_BT=logp_old,
        horizon=logp_pi_BT.shape[1],
    )


def preset_coefficients(name: str, logp_pi_NT: Tensor, logp_mu_NT: Tensor, adv_N: Tensor, *, old: str = "pi",
                        args: Mapping[str, Any] | None = None) -> Tensor:
    """Per-sequence coefficients ``c_NT`` of preset ``name`` with hyper-parameter overrides ``args`` (scaled by
    ``agg_scale``), via autograd."""
    preset = get_preset(name)
    x = logp_pi_NT.detach().clone().requires_grad_(True)
    loss, _ = preset(preset_inputs(x, logp_pi_NT.detach(), logp_mu_NT, adv_N, old=old), **(args or {}))
    (grad,) = torch.autograd.grad(loss, x)
    scale = agg_scale(preset.resolve(args).get("agg", "token-mean"), logp_pi_NT.shape[1])
    return -grad * logp_pi_NT.shape[0] * scale


def is_separable(name: str, logp_pi_NT: Tensor, logp_mu_NT: Tensor, adv_N: Tensor, *, old: str = "pi",
                 subset: int = 64, seed: int = 0, args: Mapping[str, Any] | None = None) -> bool:
    """Whether preset ``name`` is per-sequence separable here: the coefficients read off a random
    ``subset`` of sequences equal those read off the whole batch (false for batch statistics such
    as P3O's ESS or self-normalised weights whenever those are not constant)."""
    if name in NON_SEPARABLE:
        return False
    full = preset_coefficients(name, logp_pi_NT, logp_mu_NT, adv_N, old=old, args=args)
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(logp_pi_NT.shape[0], generator=g)[:subset]
    sub = preset_coefficients(name, logp_pi_NT[rows], logp_mu_NT[rows], adv_N[rows], old=old, args=args)
    return bool(torch.allclose(full[rows], sub, rtol=1e-9, atol=1e-12))


def exact_moments(logits_PV: Tensor, space: Space, c_NT: Tensor, mu_N: Tensor, grad_J: Tensor) -> Moments:
    """Exact moments of ``g_hat(y) = sum_t c_t(y) grad log pi(y_t)`` under ``y ~ mu`` (module doc)."""
    c = torch.where(mu_N[:, None] > 0, torch.nan_to_num(c_NT, nan=0.0, posinf=0.0, neginf=0.0), 0.0).detach()
    theta = logits_PV.detach().requires_grad_(True)
    logp = token_logp(theta, space)
    (mean,) = torch.autograd.grad((mu_N[:, None] * c * logp).sum(), theta)
    probs_PV = torch.softmax(logits_PV.detach(), -1)
    p_t = probs_PV[space.prefix_NT]  # [N, T, V]
    p_y = torch.exp(logp.detach())
    sq_N = (c * c * (1 - 2 * p_y + (p_t * p_t).sum(-1))).sum(-1)
    var = float((mu_N * sq_N).sum() - (mean * mean).sum())
    dropped = float((mu_N * (c == 0).all(-1)).sum())
    return _summarise(mean, grad_J, max(var, 0.0), dropped=dropped)


def _summarise(mean: Tensor, grad_J: Tensor, var: float, bias_se: float = 0.0, exact: bool = True,
               dropped: float = 0.0) -> Moments:
    err = mean - grad_J
    gn = float(grad_J.norm())
    cos = float((mean * grad_J).sum() / (mean.norm() * grad_J.norm()).clamp(min=1e-300))
    return Moments(
        bias=float(err.norm()) / gn, variance=var, mse=float((err * err).sum()) + var, cosine=cos,
        bias_se=bias_se, exact=exact, dropped=dropped,
    )


def dense_gradients(logits_PV: Tensor, space: Space, idx_MB: Tensor, c_MBT: Tensor) -> Tensor:
    """Per-batch gradients ``sum_{i, t} c_it grad log pi(y_it)`` as ``[M, P, V]`` (scatter, no autograd)."""
    M, B = idx_MB.shape
    P, V = logits_PV.shape
    probs_PV = torch.softmax(logits_PV.detach(), -1)
    rows = space.prefix_NT[idx_MB]  # [M, B, T]
    toks = space.seqs_NT[idx_MB]
    flat_rows = (rows + P * torch.arange(M)[:, None, None]).reshape(-1)
    out = torch.zeros(M * P, V, dtype=logits_PV.dtype)
    c = c_MBT.reshape(-1)
    out.index_put_((flat_rows, toks.reshape(-1)), c, accumulate=True)
    out.index_add_(0, flat_rows, -c[:, None] * probs_PV[rows.reshape(-1)])
    return out.view(M, P, V)


def sample_batches(mu_N: Tensor, num_batches: int, batch: int, *, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.multinomial(mu_N, num_batches * batch, replacement=True, generator=g).view(num_batches, batch)


def monte_carlo_moments(
    name: str,
    logits_PV: Tensor,
    space: Space,
    logp_pi_NT: Tensor,
    logp_mu_NT: Tensor,
    adv_N: Tensor,
    grad_J: Tensor,
    *,
    batch: int = 16,
    num_batches: int = 256,
    old: str = "pi",
    seed: int = 0,
    args: Mapping[str, Any] | None = None,
) -> Moments:
    """Monte Carlo moments for a non-separable preset: ``num_batches`` batches of ``batch`` sequences
    drawn from ``mu``; the batch gradient's mean estimates ``E g_hat``; per-sequence variance is
    ``batch * trace Cov(batch gradient)``; ``bias_se = sqrt(trace Cov / num_batches) / ||grad J||``."""
    mu_N = seq_probs(logp_mu_NT)
    idx = sample_batches(mu_N / mu_N.sum(), num_batches, batch, seed=seed)
    preset = get_preset(name)
    scale = agg_scale(preset.resolve(args).get("agg", "token-mean"), space.horizon)
    cs = []
    for b in range(num_batches):
        rows = idx[b]
        x = logp_pi_NT[rows].detach().clone().requires_grad_(True)
        loss, _ = preset(preset_inputs(x, logp_pi_NT[rows].detach(), logp_mu_NT[rows], adv_N[rows], old=old),
                         **(args or {}))
        (grad,) = torch.autograd.grad(loss, x)
        cs.append(-grad * scale)
    G = dense_gradients(logits_PV, space, idx, torch.stack(cs)).view(num_batches, -1)
    mean = G.mean(0)
    tr_cov = float(((G - mean) ** 2).sum(-1).mean())
    se = (tr_cov / num_batches) ** 0.5 / float(grad_J.norm())
    return _summarise(mean.view_as(grad_J), grad_J, batch * tr_cov, bias_se=se, exact=False)
