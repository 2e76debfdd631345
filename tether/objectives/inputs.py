"""The typed bundle of per-token tensors every preset consumes.

Shape suffixes (see docs/architecture.md): ``_B`` batch (sequences), ``_T`` token positions,
``_V`` vocabulary, ``_G`` groups. All per-token tensors are right-padded ``[B, T]`` and aligned:
position ``t`` holds the log-probability of token ``y_t`` given its prefix.

Normalisers (``num_tokens``, ``num_seqs``, ``horizon``) are *global* counts over the whole
optimiser step (all micro-batches, all ranks). Passing them makes the loss of a micro-batch the
exact share of the full-batch loss, so micro-batching and gradient accumulation do not change the
loss or its gradient. Left as ``None`` they default to the counts of the tensors given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class LossInputs:
    logp_theta_BT: Tensor
    """log pi_theta(y_t | s_t), carries the gradient."""
    logp_old_BT: Tensor
    """log pi_old: the trainer's policy at the start of the update (no gradient)."""
    advantages_BT: Tensor
    """Per-token advantages (sequence advantages broadcast over tokens)."""
    mask_BT: Tensor
    """1 on tokens the policy generated and that enter the loss, 0 on prompt, tool output, padding."""
    logp_mu_BT: Tensor | None = None
    """log mu: the behaviour policy that sampled y (the rollout engine)."""
    logp_prox_BT: Tensor | None = None
    """log pi_prox: a proximal anchor policy (decoupled PPO, P4O, PPO-EWMA)."""
    logp_ref_BT: Tensor | None = None
    """log pi_ref: a frozen reference for a KL penalty."""
    expert_B: Tensor | None = None
    """Bool per sequence: True for external expert / off-policy traces (CalibRL, RL-PLUS)."""
    logp_expert_old_BT: Tensor | None = None
    """pi_old log-probs of the group's expert response aligned by position (CalibRL baseline)."""
    num_tokens: float | Tensor | None = None
    """Global count of loss tokens (token-mean normaliser)."""
    num_seqs: float | Tensor | None = None
    """Global count of sequences with at least one loss token (seq-mean normaliser)."""
    horizon: int | None = None
    """Constant length normaliser for seq-mean-token-sum-norm (default: padded width T)."""
    logp_teacher_BT: Tensor | None = None
    """log pi_teacher(y_t | s_t) at the sampled tokens (on-policy distillation, sampled support)."""
    logp_theta_BTV: Tensor | None = None
    """Student log-probs over the vocabulary ``[B, T, V]``, aligned like ``logp_theta_BT`` (full / top-k
    distillation); carries the gradient."""
    logp_teacher_BTV: Tensor | None = None
    """Teacher log-probs over the vocabulary ``[B, T, V]`` (no gradient)."""
    step_BT: Tensor | None = None
    """Agent step (turn) of every token, ``long`` (the rollout's ``turn_BT``: >= 0 on loss tokens); None: a
    single-turn row, one step (StepPO)."""

    def __post_init__(self) -> None:
        shape = self.logp_theta_BT.shape
        if self.logp_theta_BT.dim() != 2:
            raise ValueError(f"LossInputs.logp_theta_BT must be [B, T], got shape {tuple(shape)}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_BT") and value is not None and value.shape != shape:
                raise ValueError(
                    f"LossInputs.{f.name} has shape {tuple(value.shape)}, expected {tuple(shape)} "
                    "(the shape of logp_theta_BT)"
                )
        for name in ("logp_theta_BTV", "logp_teacher_BTV"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape[:2]) != tuple(shape):
                raise ValueError(f"LossInputs.{name} has shape {tuple(value.shape)}, expected {tuple(shape)} + (V,)")
        if self.expert_B is not None and self.expert_B.shape != shape[:1]:
            raise ValueError(f"LossInputs.expert_B has shape {tuple(self.expert_B.shape)}, expected ({shape[0]},)")

    @property
    def maskf_BT(self) -> Tensor:
        """The loss mask as the floating dtype of the log-probs."""
        return self.mask_BT.to(self.logp_theta_BT.dtype)

    def require(self, *names: str, preset: str) -> None:
        """Raise a clear error if an optional input a preset needs is missing."""
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"objective '{preset}' needs LossInputs.{', '.join(missing)}, which was not given")


def max_or_zero(x: Tensor) -> Tensor:
    """``x.max()``, or 0 for an empty tensor (a batch with no token position, ``T = 0``)."""
    return x.max() if x.numel() else x.new_zeros(())


def min_or_zero(x: Tensor) -> Tensor:
    """``x.min()``, or 0 for an empty tensor."""
    return x.min() if x.numel() else x.new_zeros(())


def float_mask(mask_BT: Tensor, dtype: torch.dtype) -> Tensor:
    """The mask as 0./1. of ``dtype``. A bool mask is read as its bytes (``uint8 -> float`` is a
    vectorised copy on CPU, ``bool -> float`` is not); any other mask is cast as is."""
    if mask_BT.dtype == torch.bool:
        return mask_BT.view(torch.uint8).to(dtype)
    return mask_BT.to(dtype)


def indicator(compare: Callable[..., Tensor], a: Tensor, b: Tensor | float, dtype: torch.dtype | None = None) -> Tensor:
    """``compare(a, b)`` (``torch.gt``, ``torch.lt``, ...) as 0./1. of a floating ``dtype`` (default ``a``'s).

    Written straight into a floating tensor the comparison is one vectorised CPU kernel; a ``bool``
    result followed by a cast is several times slower. No gradient.
    """
    shape = a.shape if not isinstance(b, Tensor) or b.shape == a.shape else torch.broadcast_shapes(a.shape, b.shape)
    return compare(a, b, out=torch.empty(shape, dtype=dtype or a.dtype, device=a.device))


def _masked_sum(x_BT: Tensor, m_BT: Tensor) -> Tensor:
    """``sum x * m`` as one dot product (no ``[B, T]`` temporary) when the shapes agree."""
    if x_BT.shape == m_BT.shape:
        return torch.dot(x_BT.reshape(-1), m_BT.reshape(-1))
    return (x_BT * m_BT).sum()


def masked_mean(x_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Mean of ``x`` over valid entries, ``sum x m / max(sum m, 1)``; 0 when nothing is valid. Used for metrics."""
    m = float_mask(mask_BT, x_BT.dtype)
    return _masked_sum(x_BT, m) / m.sum().clamp(min=1.0)


def masked_means(values: dict[str, Tensor], mask_BT: Tensor, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """``{name: masked_mean(x, mask)}`` for several ``[B, T]`` tensors at once, detached.

    One mask conversion and one token count for all of them, one dot product per tensor. A
    ``bool`` tensor gives the fraction of valid entries where it is True (an exact count).
    Results have ``dtype`` (default: that of the first floating tensor, else the default dtype).
    """
    if not values:
        return {}
    if dtype is None:
        dtype = next((v.dtype for v in values.values() if v.is_floating_point()), torch.get_default_dtype())
    with torch.no_grad():
        valid = mask_BT.bool()
        m = {}
        sums = []
        for x in values.values():
            if x.dtype == torch.bool:
                sums.append((x & valid).count_nonzero().to(dtype))
            else:
                if x.dtype not in m:
                    m[x.dtype] = float_mask(valid, x.dtype)
                sums.append(_masked_sum(x.detach(), m[x.dtype]).to(dtype))
        # the count: sum of a float 0/1 mask already built (exact up to 2^24 tokens in float32,
        # like the sums themselves), else an integer count
        n = next(iter(m.values())).sum().to(dtype) if m else valid.count_nonzero().to(dtype)
        means = torch.stack(sums) / n.clamp(min=1.0)
    return dict(zip(values, means.unbind()))


def detach_metrics(metrics: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in metrics.items()}


def zeros_like_loss(x: Tensor) -> Tensor:
    return torch.zeros((), dtype=x.dtype, device=x.device)
