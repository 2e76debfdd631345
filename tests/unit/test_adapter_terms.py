"""What the adapters add to a preset's loss: ``kl_to_reference_term`` (TRL's ``beta`` KL) against a slow loop
written the obvious way (value and gradient, every aggregation mode, with and without the ratio weight, global
normalisers); and ``ADVANTAGE_MASKABLE``, the presets on which zeroing a token's advantage zeroes exactly that
token's loss (TRL's entropy mask)."""

from __future__ import annotations

import math

import pytest
import torch

from tether.adapters.common import ADVANTAGE_MASKABLE, kl_to_reference_term
from tether.objectives import LossInputs, get_preset

pytestmark = pytest.mark.unit

B, T = 5, 4
NORMS = {"num_tokens": 23.0, "num_seqs": 7.0, "horizon": 6}


def case():
    g = torch.Generator().manual_seed(0)
    lengths = [4, 2, 0, 3, 1]
    mask = torch.tensor([[t < n for t in range(T)] for n in lengths])
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 0.1
    theta = (old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3).requires_grad_(True)
    ref = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.6
    return theta, old, ref, mask


def loop_kl(theta, old, ref, mask, *, coef, ratio_weighted, agg, num_tokens, num_seqs, horizon):
    """coef * agg_i,t of k3(z) (times pi_theta/pi_old), one token at a time."""
    total = torch.zeros((), dtype=torch.float64)
    for i in range(B):
        row, n = torch.zeros((), dtype=torch.float64), 0
        for t in range(T):
            if not mask[i, t]:
                continue
            z = theta[i, t] - ref[i, t]
            k = torch.exp(-z) - 1 + z
            if ratio_weighted:
                k = k * torch.exp(theta[i, t] - old[i, t])
            row, n = row + k, n + 1
        if agg == "token-mean":
            total = total + row / num_tokens
        elif agg == "seq-mean-token-mean":
            total = total + (row / n if n else row) / num_seqs
        elif agg == "seq-mean-token-sum":
            total = total + row / num_seqs
        else:
            total = total + row / (num_seqs * horizon)
    return coef * total


@pytest.mark.parametrize("ratio_weighted", [True, False])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_kl_term_equals_the_loop(agg, ratio_weighted):
    theta, old, ref, mask = case()
    li = LossInputs(logp_theta_BT=theta, logp_old_BT=old, advantages_BT=torch.zeros_like(old), mask_BT=mask,
                    logp_ref_BT=ref, **NORMS)
    term, metrics = kl_to_reference_term(li, coef=0.3, ratio_weighted=ratio_weighted, agg=agg)
    (grad,) = torch.autograd.grad(term, theta)
    ref_term = loop_kl(theta, old, ref, mask, coef=0.3, ratio_weighted=ratio_weighted, agg=agg, **NORMS)
    (ref_grad,) = torch.autograd.grad(ref_term, theta)
    torch.testing.assert_close(term, ref_term, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    assert grad[~mask].abs().max() == 0 and grad[mask].abs().min() > 0
    assert metrics["kl/loss"] == pytest.approx(term.item(), rel=1e-12)
    z = (theta.detach() - ref)[mask]
    k = torch.exp(-z) - 1 + z
    if ratio_weighted:
        k = k * torch.exp(theta.detach() - old)[mask]
    assert metrics["kl/mean"].item() == pytest.approx(k.mean().item(), rel=1e-12)
    assert not math.isclose(term.item(), 0.0)


def test_kl_term_without_reference_logprobs_is_an_error():
    theta, old, _, mask = case()
    li = LossInputs(logp_theta_BT=theta, logp_old_BT=old, advantages_BT=torch.zeros_like(old), mask_BT=mask)
    with pytest.raises(ValueError, match="logp_ref_BT"):
        kl_to_reference_term(li, coef=0.1, ratio_weighted=False, agg="token-mean")


def masked_loss(preset: str, adv_BT, seed: int):
    """(loss, d loss / d logp_theta) of ``preset`` on a fixed batch with mu, ragged rows and global normalisers."""
    theta, old, _, mask = case()
    g = torch.Generator().manual_seed(seed)
    mu = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    li = LossInputs(logp_theta_BT=theta, logp_old_BT=old, advantages_BT=adv_BT, mask_BT=mask, logp_mu_BT=mu, **NORMS)
    loss, _ = get_preset(preset)(li)
    (grad,) = torch.autograd.grad(loss, theta, allow_unused=True)
    return loss.detach(), torch.zeros_like(theta) if grad is None else grad


def maskable(preset: str, seed: int) -> bool:
    """Zeroing the advantage off ``keep`` leaves each kept token's gradient, zeroes the others', and the two
    halves of the loss add up to the whole (and a zero advantage gives a zero loss)."""
    _, _, _, mask = case()
    g = torch.Generator().manual_seed(seed)
    adv_BT = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).clone()
    keep = (torch.rand(B, T, generator=g) < 0.5) & mask
    whole, g_whole = masked_loss(preset, adv_BT, seed)
    kept, g_kept = masked_loss(preset, adv_BT * keep, seed)
    dropped, _ = masked_loss(preset, adv_BT * ~keep, seed)
    zero, _ = masked_loss(preset, adv_BT * 0, seed)
    return (math.isclose(float(kept + dropped), float(whole), rel_tol=1e-12, abs_tol=1e-12) and float(zero) == 0
            and float(g_kept[~keep].abs().max()) == 0
            and torch.allclose(g_kept[keep], g_whole[keep], rtol=1e-12, atol=1e-12))


@pytest.mark.parametrize("preset", ADVANTAGE_MASKABLE)
def test_zeroing_a_tokens_advantage_zeroes_exactly_its_loss(preset):
    assert all(maskable(preset, seed) for seed in (1, 2, 3))


@pytest.mark.parametrize("preset", ["sft", "geo_mean", "luspo"])
def test_the_maskable_check_sees_presets_it_does_not_fit(preset):
    """The check can fail: SFT ignores the advantage, geo_mean and luspo couple a sequence's tokens."""
    assert preset not in ADVANTAGE_MASKABLE
    assert not all(maskable(preset, seed) for seed in (1, 2, 3))
