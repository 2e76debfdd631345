"""Per-token losses whose derivative is written in closed form instead of recorded by autograd.

A clipped surrogate such as PPO's is an elementwise function ``l_t = f(x_t)`` of one
differentiable per-token input ``x`` (a log-ratio). Recorded op by op, autograd keeps several
``[B, T]`` tensors for the backward pass (the ratio, the clamp's input, the two branches of
``max`` and ``min``, the masks) and replays a dozen backward kernels. The derivative is known:
``d l_t / d x_t`` is one tensor, so ``elementwise_loss`` computes it in the forward pass, saves
only it, and the backward pass is a single multiply ``grad_t * d l_t / d x_t``.

Use it only for functions that are elementwise in ``x`` (token ``t`` of the loss depends on
token ``t`` of ``x`` alone); everything else ``fn`` reads is a constant. The gradient of whatever
produced ``x`` (the log-ratio's own stop-gradient path) is still autograd's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

ValueAndGrad = Callable[[Tensor], tuple[Tensor, ...]]


class _ElementwiseLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BT: Tensor, value_and_grad: ValueAndGrad) -> tuple[Tensor, ...]:  # type: ignore[override]
        value, dvalue_dx, *extra = value_and_grad(x_BT)
        ctx.save_for_backward(dvalue_dx)
        ctx.mark_non_differentiable(*extra)
        return (value, *extra)

    @staticmethod
    def backward(ctx, grad_BT: Tensor, *_: Tensor) -> tuple[Tensor | None, None]:  # type: ignore[override]
        (dvalue_dx,) = ctx.saved_tensors
        return grad_BT * dvalue_dx, None


def elementwise_loss(x_BT: Tensor, value_and_grad: ValueAndGrad) -> tuple[Tensor, ...]:
    """``(l, *extra)`` with ``(l, dl/dx, *extra) = value_and_grad(sg(x))`` and ``d l / d x`` attached.

    ``value_and_grad`` runs without autograd on the detached ``x`` and returns the per-token value,
    its derivative with respect to ``x`` (same shape), and any number of extra tensors (masks for
    metrics) that come back non-differentiable. Only ``dl/dx`` is saved for backward. Not twice
    differentiable (the derivative is a constant of the backward pass).
    """
    return _ElementwiseLoss.apply(x_BT, value_and_grad)
