"""Random float64 inputs shared by the ratio-family tests (sequence_ratio, weighted_pg, ess)."""

from __future__ import annotations

import math

import torch

from tether.objectives.inputs import LossInputs


def make_mask(B: int, T: int, gen: torch.Generator) -> torch.Tensor:
    """Row 0 empty, row 1 length-1, row 2 with holes (tool output), the rest random right-padded."""
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[1, 0] = True
    mask[2, :] = torch.tensor([(t % 3) != 2 for t in range(T)])
    for i in range(3, B):
        n = int(torch.randint(1, T + 1, (1,), generator=gen))
        mask[i, :n] = True
    return mask


def make_inputs(
    seed: int = 0,
    B: int = 7,
    T: int = 6,
    *,
    scale: float = 0.4,
    extreme: bool = True,
    mask: torch.Tensor | None = None,
    prox: bool = False,
) -> LossInputs:
    gen = torch.Generator().manual_seed(seed)
    mask = make_mask(B, T, gen) if mask is None else mask
    logp_old = -3.0 * torch.rand(B, T, generator=gen, dtype=torch.float64)
    delta = scale * torch.randn(B, T, generator=gen, dtype=torch.float64)
    if extreme:
        valid = mask.nonzero().tolist()
        for k, (i, t) in enumerate(valid[1::3]):
            delta[i, t] = 50.0 if k % 2 == 0 else -50.0
    logp_theta = (logp_old + delta).requires_grad_(True)
    adv_B = torch.randn(B, generator=gen, dtype=torch.float64)
    adv_B[-1] = 0.0
    advantages = adv_B[:, None].expand(B, T) * mask
    logp_prox = None
    if prox:
        logp_prox = logp_old + scale * torch.randn(B, T, generator=gen, dtype=torch.float64)
    return LossInputs(
        logp_theta_BT=logp_theta,
        logp_old_BT=logp_old,
        advantages_BT=advantages,
        mask_BT=mask,
        logp_prox_BT=logp_prox,
    )


def rows(inputs: LossInputs):
    """Yield per-row python lists: (valid positions, theta, old, adv)."""
    th = inputs.logp_theta_BT.detach().tolist()
    old = inputs.logp_old_BT.tolist()
    adv = inputs.advantages_BT.tolist()
    mask = inputs.mask_BT.tolist()
    for i in range(len(th)):
        yield i, [t for t, m in enumerate(mask[i]) if m], th[i], old[i], adv[i]


def clamp(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


def token_delta(th: float, old: float) -> float:
    return clamp(th - old, -20.0, 20.0)


def exp(x: float) -> float:
    return math.exp(x)


def grad_of(loss: torch.Tensor, inputs: LossInputs) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, inputs.logp_theta_BT)
    return g
