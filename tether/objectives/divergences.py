"""Token-level divergences between a teacher and a student over student-sampled prefixes.

The on-policy distillation objective (OPD survey, Song & Zheng, arXiv 2604.00626; methods.md §(b)1)
is ``L_f = E_{y ~ pi_theta} sum_t D_f(pi_T(.|s_t) || pi_theta(.|s_t))`` with the prefixes ``s_t``
taken from the student and, for an f-divergence, ``D_f(P || Q) = sum_v Q(v) f(P(v) / Q(v))``
with ``P`` the teacher and ``Q`` the student. Every function here works on log-probabilities over
the last axis (``..._V``) and returns one value per leading position (``[B, T]`` in practice).

Divergences (``P = p_t`` teacher, ``Q = p_s`` student):

- ``forward_kl``:  ``KL(p_t || p_s) = sum_v p_t (log p_t - log p_s)``          (f(u) = u log u)
- ``reverse_kl``:  ``KL(p_s || p_t) = sum_v p_s (log p_s - log p_t)``          (f(u) = -log u)
- ``jsd`` (generalised, GKD / trl ``generalized_jsd_loss`` as used by OPSD and CaOPD):
  ``M = beta p_t + (1 - beta) p_s``, ``JSD_beta = beta KL(p_t || M) + (1 - beta) KL(p_s || M)``;
  at the end points the trl convention is kept: ``beta = 0`` is ``KL(p_t || p_s)`` (forward) and
  ``beta = 1`` is ``KL(p_s || p_t)`` (reverse).
- ``tv``: ``TV = 1/2 sum_v |p_t - p_s|``                                       (f(u) = |u - 1| / 2)

Supports (where the sum over ``v`` runs):

- ``full``: the whole vocabulary.
- ``topk_teacher`` / ``topk_student``: the ``k`` most likely tokens of the teacher or of the
  (detached) student, plus one *tail bucket* holding the remaining mass
  ``log p(tail) = logsumexp_{v not in K} log p(v)``, so each side is still a distribution over
  ``k + 1`` outcomes (:func:`topk_buckets`). With ``tail=False`` the ``k`` entries are
  renormalised instead (OPSD ``top_k_loss``).
- ``sampled``: only the sampled token ``y_t ~ p_s`` (:func:`sampled_surrogate`). For the reverse
  KL this is the per-token "advantage" form of on-policy distillation
  ``l_t = -sg(log p_t(y_t) - log p_s(y_t)) log p_s(y_t)`` (siyan-zhao/OPSD
  ``use_tinker_loss``; thinking-machines / tinker-cookbook OPD).

Stop-gradient form (:func:`reverse_kl_pg`): "The Many Faces of OPD" (arXiv 2605.11182) reports biased
top-k reverse-KL gradients; its fix, as we read it (INFERRED, methods.md §(b)4), is the
policy-gradient form over a fixed support ``-sum_v sg(p_s) sg(log p_t - log p_s) log p_s``, whose
gradient is that of the reverse KL with the support and the bucket masses held fixed.
"""

from __future__ import annotations

import math
from enum import Enum

import torch
from torch import Tensor

from tether.objectives.aggregation import parse_choice

EMPTY_BUCKET_LOGP = -1.0e4
"""Log-probability given to an empty tail bucket (k = V): exp(-1e4) is exactly 0 in float32/64, and
a finite value keeps values and gradients free of ``0 * inf``."""


class Divergence(str, Enum):
    FORWARD_KL = "forward_kl"
    REVERSE_KL = "reverse_kl"
    JSD = "jsd"
    TV = "tv"

    @classmethod
    def parse(cls, value: str | Divergence) -> Divergence:
        return parse_choice(cls, value, "divergence")


class Support(str, Enum):
    FULL = "full"
    SAMPLED = "sampled"
    TOPK_TEACHER = "topk_teacher"
    TOPK_STUDENT = "topk_student"

    @classmethod
    def parse(cls, value: str | Support) -> Support:
        return parse_choice(cls, value, "divergence support")


def _kl(logp_a_V: Tensor, logp_b_V: Tensor) -> Tensor:
    """``KL(a || b) = sum_v a (log a - log b)`` over the last axis (entries with ``a = 0`` add 0)."""
    return (logp_a_V.exp() * (logp_a_V - logp_b_V)).sum(-1)


def forward_kl(logp_s_BTV: Tensor, logp_t_BTV: Tensor) -> Tensor:
    """``KL(p_t || p_s) = sum_v p_t(v) (log p_t(v) - log p_s(v))`` per position (mode-covering).

    Gradient w.r.t. the student logits ``z``: ``p_s - p_t`` (cross-entropy to the teacher).
    Source: OPD survey f(u) = u log u; CaOPD ``_compute_loss`` with alpha = 0.
    """
    return _kl(logp_t_BTV, logp_s_BTV)


def reverse_kl(logp_s_BTV: Tensor, logp_t_BTV: Tensor) -> Tensor:
    """``KL(p_s || p_t) = sum_v p_s(v) (log p_s(v) - log p_t(v))`` per position (mode-seeking).

    The "standard" on-policy distillation divergence (OPD survey f(u) = -log u; Gu et al. MiniLLM).
    """
    return _kl(logp_s_BTV, logp_t_BTV)


def generalized_jsd(logp_s_BTV: Tensor, logp_t_BTV: Tensor, *, beta: float = 0.5) -> Tensor:
    """``JSD_beta = beta KL(p_t || M) + (1 - beta) KL(p_s || M)``, ``M = beta p_t + (1 - beta) p_s``.

    ``log M = logsumexp(log p_t + log beta, log p_s + log(1 - beta))``. End points as trl /
    siyan-zhao/OPSD ``generalized_jsd_loss``: ``beta = 0`` returns ``KL(p_t || p_s)``, ``beta = 1``
    returns ``KL(p_s || p_t)``. ``beta`` must lie in [0, 1].
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized_jsd: beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(logp_s_BTV, logp_t_BTV)
    if beta == 1.0:
        return reverse_kl(logp_s_BTV, logp_t_BTV)
    log_m = torch.logsumexp(torch.stack([logp_t_BTV + math.log(beta), logp_s_BTV + math.log(1.0 - beta)]), 0)
    return beta * _kl(logp_t_BTV, log_m) + (1.0 - beta) * _kl(logp_s_BTV, log_m)


def total_variation(logp_s_BTV: Tensor, logp_t_BTV: Tensor) -> Tensor:
    """``TV(p_t, p_s) = 1/2 sum_v |p_t(v) - p_s(v)|`` per position (f(u) = |u - 1| / 2)."""
    return 0.5 * (logp_t_BTV.exp() - logp_s_BTV.exp()).abs().sum(-1)


def divergence(logp_s_BTV: Tensor, logp_t_BTV: Tensor, name: str | Divergence, *, beta: float = 0.5) -> Tensor:
    """Dispatch to the named divergence (``beta`` is used by ``jsd`` only)."""
    d = Divergence.parse(name)
    if d is Divergence.FORWARD_KL:
        return forward_kl(logp_s_BTV, logp_t_BTV)
    if d is Divergence.REVERSE_KL:
        return reverse_kl(logp_s_BTV, logp_t_BTV)
    if d is Divergence.JSD:
        return generalized_jsd(logp_s_BTV, logp_t_BTV, beta=beta)
    return total_variation(logp_s_BTV, logp_t_BTV)


def topk_buckets(logp_s_BTV: Tensor, logp_t_BTV: Tensor, *, k: int, source: str = "teacher",
                 tail: bool = True) -> tuple[Tensor, Tensor]:
    """Restrict both distributions to the top-``k`` tokens of ``source`` (+ a tail bucket).

    ``K`` = indices of the ``k`` largest ``log p_source`` (the student's are detached: the support is
    not differentiated). Returns ``(logp_s_BTK1, logp_t_BTK1)`` with last axis ``k + 1``: the ``k``
    gathered log-probs, then ``log p(tail) = logsumexp_{v not in K} log p(v)`` (so each row still
    sums to 1; an empty tail, k = V, gets ``EMPTY_BUCKET_LOGP``). With ``tail=False`` the last axis
    is ``k`` and each side is renormalised over ``K``: ``log p(v) - logsumexp_{u in K} log p(u)``.
    """
    V = logp_s_BTV.shape[-1]
    if not 1 <= k <= V:
        raise ValueError(f"topk_buckets: k must be in [1, V={V}], got {k}")
    if source not in ("teacher", "student"):
        raise ValueError(f"topk_buckets: source must be 'teacher' or 'student', got {source!r}")
    ref = (logp_t_BTV if source == "teacher" else logp_s_BTV).detach()
    idx = ref.topk(k, dim=-1).indices
    s_K, t_K = logp_s_BTV.gather(-1, idx), logp_t_BTV.gather(-1, idx)
    if not tail:
        return s_K - s_K.logsumexp(-1, keepdim=True), t_K - t_K.logsumexp(-1, keepdim=True)
    chosen = torch.zeros_like(logp_s_BTV, dtype=torch.bool).scatter_(-1, idx, True)

    def rest(lp: Tensor) -> Tensor:
        if k == V:
            return torch.full_like(lp[..., :1], EMPTY_BUCKET_LOGP)
        return lp.masked_fill(chosen, float("-inf")).logsumexp(-1, keepdim=True).clamp(min=EMPTY_BUCKET_LOGP)

    return torch.cat([s_K, rest(logp_s_BTV)], -1), torch.cat([t_K, rest(logp_t_BTV)], -1)


def supported_divergence(logp_s_BTV: Tensor, logp_t_BTV: Tensor, name: str | Divergence, *,
                         support: str | Support = Support.FULL, k: int = 16, beta: float = 0.5,
                         tail: bool = True) -> Tensor:
    """The named divergence over the full vocabulary or a top-k support (see :func:`topk_buckets`)."""
    sup = Support.parse(support)
    if sup is Support.SAMPLED:
        raise ValueError("supported_divergence: the 'sampled' support needs the sampled tokens; "
                         "use sampled_surrogate")
    if sup is not Support.FULL:
        source = "teacher" if sup is Support.TOPK_TEACHER else "student"
        logp_s_BTV, logp_t_BTV = topk_buckets(logp_s_BTV, logp_t_BTV, k=k, source=source, tail=tail)
    return divergence(logp_s_BTV, logp_t_BTV, name, beta=beta)


def reverse_kl_pg(logp_s_BTV: Tensor, logp_t_BTV: Tensor) -> Tensor:
    """Stop-gradient (policy-gradient) reverse KL over a given support.

    Value: ``KL(p_s || p_t)``. Gradient: that of ``-sum_v sg(p_s) sg(log p_t - log p_s) log p_s``,
    i.e. ``sum_v p_s (log p_s - log p_t) grad log p_s``, which equals the gradient of the reverse KL
    on that support (``sum_v p_s grad log p_s = 0``). Applied to :func:`topk_buckets` output it holds
    the chosen support fixed ("The Many Faces of OPD" stop-gradient fix, INFERRED reading).
    """
    p = logp_s_BTV.detach().exp()
    adv = (logp_t_BTV - logp_s_BTV).detach()
    surrogate = -(p * adv * logp_s_BTV).sum(-1)
    return surrogate - surrogate.detach() + reverse_kl(logp_s_BTV.detach(), logp_t_BTV.detach())


def sampled_coefficient(logp_s_BT: Tensor, logp_t_BT: Tensor, name: str | Divergence) -> Tensor:
    """Detached per-token score-function coefficient ``c(u) - c(1)`` with ``u = p_t(y) / p_s(y)``.

    For ``D_f = E_{y ~ p_s}[f(u)]``: ``grad D_f = E_{y ~ p_s}[(f(u) - u f'(u)) grad log p_s(y)]``;
    ``c(u) = f(u) - u f'(u)``, minus the constant ``c(1)`` (a baseline, zero-mean under p_s):

    - reverse KL, f = -log u:   ``c(u) - c(1) = -log u = log p_s - log p_t``
    - forward KL, f = u log u:  ``c(u) - c(1) = 1 - u``
    - TV, f = |u - 1| / 2:      ``c(u) - c(1) = -sign(u - 1) / 2``

    The generalised JSD has no sampled form here (its ``f`` depends on beta through a mixture).
    """
    d = Divergence.parse(name)
    log_u = (logp_t_BT - logp_s_BT).detach()
    if d is Divergence.REVERSE_KL:
        return -log_u
    if d is Divergence.FORWARD_KL:
        return 1.0 - log_u.exp()
    if d is Divergence.TV:
        return -0.5 * torch.sign(log_u)
    raise ValueError(f"divergence '{d.value}' has no sampled-token form; use reverse_kl, forward_kl or tv, "
                     "or a full / top-k support")


def sampled_surrogate(logp_s_BT: Tensor, logp_t_BT: Tensor, name: str | Divergence = Divergence.REVERSE_KL) -> Tensor:
    """Per-token surrogate ``l_t = sg(c_t) log p_s(y_t)`` at the sampled token ``y_t ~ p_s``.

    Its gradient is an unbiased single-sample estimate of the gradient of ``D_f`` at that position
    (see :func:`sampled_coefficient`); for the reverse KL it is the OPD advantage form
    ``-sg(log p_t(y_t) - log p_s(y_t)) log p_s(y_t)`` (siyan-zhao/OPSD ``use_tinker_loss``).
    Future-token effects of ``y_t`` on later prefixes are ignored, as in the sources.
    """
    return sampled_coefficient(logp_s_BT, logp_t_BT, name) * logp_s_BT
