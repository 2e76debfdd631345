"""Importance ratios, all in log space.

Notation (methods.md §0): ``delta_t = clamp(log p(y_t) - log q(y_t), -c, c)`` on loss tokens and
``0`` elsewhere; ``m_t`` is the loss mask. Every function returns *log* ratios; callers take
``exp`` only where the equation needs the ratio itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

LOG_RATIO_CLAMP = 20.0
"""Per-token log-ratios are clamped to [-20, 20] before any exp (verl, CTPO)."""
SG_LOG_RATIO_MAX = 10.0
"""Stop-gradient ratio forms (GSPO, CTPO) clamp the log-ratio at +10 (verl, CTPO)."""


class _TokenLogRatio(torch.autograd.Function):
    """``m * clamp(a - b, -c, c)`` whose backward keeps one bool mask instead of the float difference."""

    @staticmethod
    def forward(ctx, a_BT: Tensor, b_BT: Tensor, valid_BT: Tensor, clamp: float) -> Tensor:  # type: ignore[override]
        diff = a_BT - b_BT
        delta = diff.clamp(-clamp, clamp)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            # clamp passes the gradient on [-c, c] inclusive, i.e. where it returned its input unchanged
            # (compared into a float tensor, then cast: twice as fast on CPU as a bool comparison)
            same = torch.eq(delta, diff, out=torch.empty_like(delta)).bool()
            ctx.save_for_backward(same.logical_and_(valid_BT))
        return torch.where(valid_BT, delta, 0.0)

    @staticmethod
    def backward(ctx, grad_BT: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:  # type: ignore[override]
        (passes,) = ctx.saved_tensors
        g = torch.where(passes, grad_BT, 0.0)
        return (g if ctx.needs_input_grad[0] else None), (-g if ctx.needs_input_grad[1] else None), None, None


def token_log_ratio(logp_num_BT: Tensor, logp_den_BT: Tensor, mask_BT: Tensor, *, clamp: float = LOG_RATIO_CLAMP) -> Tensor:
    """Token log-ratio ``delta_t = m_t * clamp(log p_t - log q_t, -clamp, clamp)``.

    Gradient flows through whichever argument carries it (normally ``logp_num`` = log pi_theta):
    ``d delta_t / d log p_t = m_t 1[|log p_t - log q_t| <= clamp]``.
    Padding gets exactly 0, so masked positions never produce NaN or Inf downstream.
    """
    valid = mask_BT.bool()
    needs_grad = torch.is_grad_enabled() and (logp_num_BT.requires_grad or logp_den_BT.requires_grad)
    if needs_grad and logp_num_BT.shape == logp_den_BT.shape == valid.shape:
        return _TokenLogRatio.apply(logp_num_BT, logp_den_BT, valid, clamp)
    delta = (logp_num_BT - logp_den_BT).clamp(-clamp, clamp)
    return torch.where(valid, delta, 0.0)


def sequence_log_ratio(log_ratio_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Sequence (product) log-ratio ``log s_i = sum_t m_t delta_t``  -> ``[B]``."""
    return (log_ratio_BT * mask_BT.to(log_ratio_BT.dtype)).sum(-1)


def geometric_log_ratio(log_ratio_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Geometric-mean log-ratio ``(1/|y_i|) sum_t m_t delta_t`` -> ``[B]`` (0 for empty rows)."""
    m = mask_BT.to(log_ratio_BT.dtype)
    return (log_ratio_BT * m).sum(-1) / m.sum(-1).clamp(min=1.0)


def straight_through_log_ratio(
    value_log_ratio_BT: Tensor, logp_theta_BT: Tensor, *, max_log: float = SG_LOG_RATIO_MAX
) -> Tensor:
    """``log rho~_t = sg(value_t) + log pi_theta(y_t) - sg(log pi_theta(y_t))``, clamped at ``max_log``.

    The value is ``value_t``; the gradient is ``grad log pi_theta(y_t)``, so ``exp`` of it has
    value ``rho_t`` and gradient ``rho_t * grad log pi_theta(y_t)``: the prefix / sequence
    correction acts as a weight only (GSPO's and CTPO's stop-gradient decomposition).
    """
    value = value_log_ratio_BT.detach()
    if torch.is_grad_enabled() and logp_theta_BT.requires_grad and value.shape == logp_theta_BT.shape:
        return _StraightThrough.apply(value, logp_theta_BT, max_log)
    out = value + logp_theta_BT - logp_theta_BT.detach()
    return out.clamp(max=max_log)


class _StraightThrough(torch.autograd.Function):
    """``clamp(v + x - sg(x), max)`` whose backward keeps one bool mask (where the clamp passes)."""

    @staticmethod
    def forward(ctx, value_BT: Tensor, x_BT: Tensor, max_log: float) -> Tensor:  # type: ignore[override]
        out = value_BT + x_BT - x_BT
        ctx.save_for_backward(out <= max_log)
        return out.clamp(max=max_log)

    @staticmethod
    def backward(ctx, grad_BT: Tensor) -> tuple[None, Tensor, None]:  # type: ignore[override]
        (passes,) = ctx.saved_tensors
        return None, torch.where(passes, grad_BT, 0.0), None


def gspo_log_ratio(
    logp_theta_BT: Tensor,
    logp_old_BT: Tensor,
    mask_BT: Tensor,
    *,
    clamp: float = LOG_RATIO_CLAMP,
    max_log: float = SG_LOG_RATIO_MAX,
) -> Tensor:
    """GSPO token form of the geometric-mean sequence ratio (Zheng et al. 2025; verl ``gspo``).

    ``log s_i = (1/|y_i|) sum_t m_t delta_t``;
    ``log s_{i,t} = sg(log s_i) + log pi_theta(y_t) - sg(log pi_theta(y_t))`` (clamped at ``max_log``).
    Value: ``s_i`` on every token; gradient: ``s_i * grad log pi_theta(y_t)``.
    """
    return _gspo_log_ratio(logp_theta_BT, logp_old_BT, mask_BT, clamp=clamp, max_log=max_log)[0]


def _gspo_log_ratio(
    logp_theta_BT: Tensor, logp_old_BT: Tensor, mask_BT: Tensor, *, clamp: float, max_log: float
) -> tuple[Tensor, Tensor]:
    """``(gspo_log_ratio, delta)`` with ``delta`` the detached token log-ratio it was built from."""
    with torch.no_grad():  # the value is detached below: no graph for it
        delta = token_log_ratio(logp_theta_BT.detach(), logp_old_BT, mask_BT, clamp=clamp)
        log_s_B = geometric_log_ratio(delta, mask_BT)
    return straight_through_log_ratio(log_s_B[:, None].expand_as(delta), logp_theta_BT, max_log=max_log), delta


def cumulative_log_ratio(
    logp_theta_BT: Tensor,
    logp_old_BT: Tensor,
    mask_BT: Tensor,
    *,
    geomean: bool = False,
    clamp: float = LOG_RATIO_CLAMP,
    max_log: float = SG_LOG_RATIO_MAX,
) -> Tensor:
    """Cumulative-token ratio of CTPO (horizon-llm/CTPO ``_compute_policy_loss_cum_token_impl``).

    cumprod: ``l_t = sum_{j<=t} m_j delta_j`` (``rho_t = prod_{j<=t, m_j=1} r_j``);
    geomean: ``l_t = (sum_{j<=t} m_j delta_j) / (sum_{j<=t} m_j)``.
    Returned with the stop-gradient path ``sg(l_t) + log pi_theta(y_t) - sg(log pi_theta(y_t))``,
    clamped at ``max_log``: value ``rho_t``, gradient ``rho_t * grad log pi_theta(y_t)``.
    Only loss tokens enter the product (tool output and padding do not).
    """
    return _cumulative_log_ratio(logp_theta_BT, logp_old_BT, mask_BT, geomean=geomean, clamp=clamp, max_log=max_log)[0]


def _cumulative_log_ratio(
    logp_theta_BT: Tensor, logp_old_BT: Tensor, mask_BT: Tensor, *, geomean: bool, clamp: float, max_log: float,
    positions_BT: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(cumulative_log_ratio, delta)`` with ``delta`` the detached token log-ratio it was built from;
    ``positions_BT``: ``masked_positions(mask)`` if the caller has it."""
    with torch.no_grad():  # the value is detached below: no graph for it
        delta = token_log_ratio(logp_theta_BT.detach(), logp_old_BT, mask_BT, clamp=clamp)
        cum = torch.cumsum(delta, dim=-1)
        if geomean:
            pos = masked_positions(mask_BT) if positions_BT is None else positions_BT
            cum = cum / pos.to(cum.dtype).clamp(min=1.0)
    return straight_through_log_ratio(cum, logp_theta_BT, max_log=max_log), delta


def masked_positions(mask_BT: Tensor) -> Tensor:
    """1-indexed position among loss tokens, ``p_t = sum_{j<=t} m_j`` (CTPO-LA's position)."""
    if mask_BT.dtype == torch.bool:  # read the bool mask as bytes (a faster cast than bool -> long)
        return torch.cumsum(mask_BT.view(torch.uint8), dim=-1, dtype=torch.long)
    return torch.cumsum(mask_BT.to(torch.long), dim=-1)
