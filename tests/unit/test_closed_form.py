"""Closed-form derivatives (autograd.Function) against the same maths recorded op by op by autograd.

Each reference below is the plain autograd composition the fused version replaced; values must
agree to rounding and gradients to rounding (random inputs have no exact floating-point ties, the
only place the two are allowed to differ, see ``policy_gradient.clipped_surrogate``). Plus
``gradcheck`` in float64 and a check that the clipped surrogate keeps a single float tensor for
its backward pass (the point of the exercise).
"""

from __future__ import annotations

import math

import pytest
import torch

from tether.objectives.closed_form import elementwise_loss
from tether.objectives.decoupled import ppo_ewma_loss
from tether.objectives.ess import KL_EXP_CLAMP, kl_k3
from tether.objectives.hybrid import calibrl_guidance_loss, rlplus_off_policy_loss
from tether.objectives.inputs import masked_mean, masked_means
from tether.objectives.policy_gradient import ppo_clip_loss
from tether.objectives.ratios import cumulative_log_ratio, straight_through_log_ratio, token_log_ratio
from tether.objectives.sequence_ratio import ctpo_la_loss

pytestmark = pytest.mark.unit
DT = torch.float64
TOL = {"rtol": 1e-12, "atol": 1e-14}


def _data(seed: int, B: int = 6, T: int = 9, scale: float = 0.3, extreme: bool = False):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=DT) * 3
    theta = old + scale * torch.randn(B, T, generator=g, dtype=DT)
    if extreme:
        theta[0, :3] = old[0, :3] + torch.tensor([50.0, -50.0, 15.0], dtype=DT)
    adv = torch.randn(B, T, generator=g, dtype=DT)
    adv[1] = 0.0
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[2] = False
    mask[3] = False
    mask[3, 4] = True
    pad = ~mask
    theta = torch.where(pad, torch.full_like(theta, 1e4), theta)  # garbage on padding must stay out
    return theta, old, adv, mask


def _grad(fn, x: torch.Tensor, w: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    out = out[0] if isinstance(out, tuple) else out
    w = torch.ones_like(out) if w is None else w
    (g,) = torch.autograd.grad((out * w).sum(), x)
    return out.detach(), g


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, **TOL)


# ------------------------------------------------------------------------------------------------
# plain autograd references


def ref_token_log_ratio(a, b, mask, clamp=20.0):
    d = (a - b).clamp(-clamp, clamp)
    return torch.where(mask, d, torch.zeros_like(d))


def ref_ppo_clip(lr, A, eps_low, eps_high, c, w):
    ratio = torch.exp(lr)
    l1 = -A * ratio
    l2 = -A * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss = torch.maximum(l1, l2)
    if c is not None:
        loss = torch.where(A < 0, torch.minimum(loss, -A * c), loss)
    return loss if w is None else w * loss


def ref_ctpo_la(log_rho, A, mask, c_low, c_high, c_c, power):
    sigma = torch.cumsum(mask.long(), -1).clamp(min=1).to(log_rho.dtype) ** power
    lo, hi = -c_low * sigma, c_high * sigma
    l1 = -A * torch.exp(log_rho)
    l2 = -A * torch.exp(torch.clamp(log_rho, min=lo, max=hi))
    loss = torch.maximum(l1, l2)
    return torch.where(A < 0, torch.minimum(loss, -A * torch.exp(c_c * sigma)), loss)


def ref_kl_k3(lp, anchor, mask):
    z = torch.where(mask, lp - anchor, torch.zeros_like(lp))
    return z + torch.exp(torch.clamp(-z, -KL_EXP_CLAMP, KL_EXP_CLAMP)) - 1.0


def ref_guidance(lp, base, A, mask, slope):
    sign = torch.where(A > 0, torch.ones_like(A), -torch.ones_like(A))
    u = torch.where(mask, -sign * (lp - base), torch.zeros_like(lp))
    g = A.abs() * torch.nn.functional.leaky_relu(u, negative_slope=slope)
    return torch.where(mask, g, torch.zeros_like(g))


def ref_rlplus(lp, old, A, mask, power):
    p = torch.exp(torch.where(mask, lp, torch.zeros_like(lp)))
    p_old = torch.exp(torch.where(mask, old, torch.zeros_like(old)))
    r = p / (0.75 * p_old + 0.25)
    loss = -r * (A * (1.0 - p.detach()).clamp(min=0.0) ** power)
    return torch.where(mask, loss, torch.zeros_like(loss))


def ref_ppo_ewma(lp_in, ewma, mu, A, mask, eps, ims, kl):
    lp = torch.where(mask, lp_in, torch.zeros_like(lp_in))
    ewma = torch.where(mask, ewma, torch.zeros_like(ewma))
    mu = torch.where(mask, mu, torch.zeros_like(mu))
    adj = torch.maximum(mu, lp.detach() - math.log(ims))
    l1 = -A * torch.exp(lp - adj)
    lo = math.log1p(-eps) if eps < 1 else -math.inf
    l2 = -A * torch.exp((lp - ewma).clamp(lo, math.log1p(eps)) + ewma - adj)
    loss = torch.maximum(l1, l2)
    return loss + kl * 0.5 * (lp - ewma) ** 2 if kl else loss


# ------------------------------------------------------------------------------------------------
# tests


def test_elementwise_loss_gradcheck_and_extras():
    x = torch.randn(3, 4, dtype=DT, requires_grad=True)

    def f(t):
        value, flag = elementwise_loss(t, lambda v: (v**3, 3 * v**2, v > 0))
        assert not flag.requires_grad
        return value

    assert torch.autograd.gradcheck(f, (x,))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("extreme", [False, True])
def test_token_log_ratio_matches_autograd_through_either_argument(seed, extreme):
    theta, old, _, mask = _data(seed, extreme=extreme)
    w = torch.randn_like(theta)
    v, g = _grad(lambda x: token_log_ratio(x, old, mask), theta, w)
    v_ref, g_ref = _grad(lambda x: ref_token_log_ratio(x, old, mask), theta, w)
    _close(v, v_ref)
    _close(g, g_ref)
    _, g_den = _grad(lambda x: token_log_ratio(theta, x, mask), old, w)
    _, g_den_ref = _grad(lambda x: ref_token_log_ratio(theta, x, mask), old, w)
    _close(g_den, g_den_ref)
    assert torch.autograd.gradcheck(lambda x: token_log_ratio(x, old, mask), (theta.clone().requires_grad_(),))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dual", [None, 3.0])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize(("eps_low", "eps_high"), [(0.2, 0.28), (math.inf, math.inf)])
def test_ppo_clip_matches_autograd(seed, dual, weighted, eps_low, eps_high):
    theta, old, adv, mask = _data(seed, scale=0.4, extreme=True)
    lr0 = ref_token_log_ratio(theta, old, mask)
    w = torch.rand_like(theta) * 2 if weighted else None
    up = torch.randn_like(theta)

    def fused(x):
        return ppo_clip_loss(x, adv, mask, eps_low=eps_low, eps_high=eps_high, dual_clip_c=dual, weight_BT=w)[0]

    v, g = _grad(fused, lr0, up)
    v_ref, g_ref = _grad(lambda x: ref_ppo_clip(x, adv, eps_low, eps_high, dual, w), lr0, up)
    _close(v, v_ref)
    _close(g, g_ref)


def test_ppo_clip_gradcheck_and_single_saved_tensor():
    g = torch.Generator().manual_seed(3)
    lr = (0.3 * torch.randn(3, 5, generator=g, dtype=DT)).requires_grad_(True)
    adv = torch.randn(3, 5, generator=g, dtype=DT)
    mask = torch.ones(3, 5, dtype=torch.bool)
    w = torch.rand(3, 5, generator=g, dtype=DT)

    def f(x):
        return ppo_clip_loss(x, adv, mask, eps_low=0.2, eps_high=0.2, dual_clip_c=3.0, weight_BT=w)[0]

    assert torch.autograd.gradcheck(f, (lr,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        f(lr)
    assert len(saved) == 1 and saved[0].shape == lr.shape  # only d l / d log-ratio


@pytest.mark.parametrize("seed", [0, 1])
def test_straight_through_matches_autograd(seed):
    theta, old, _, mask = _data(seed, scale=2.0)
    value = torch.cumsum(ref_token_log_ratio(theta, old, mask), -1)
    value[0, 5:] = 12.0  # above the +10 cap: no gradient there
    value[1, 3] = 10.0  # on the cap: the clamp passes the gradient
    w = torch.randn_like(theta)
    v, g = _grad(lambda x: straight_through_log_ratio(value, x), theta, w)
    v_ref, g_ref = _grad(lambda x: (value.detach() + x - x.detach()).clamp(max=10.0), theta, w)
    _close(v, v_ref)
    _close(g, g_ref)
    assert (g_ref == 0).any() and (g_ref != 0).any()
    # (no gradcheck: a stop-gradient path is by design not the numerical derivative)
    _, g_cum = _grad(lambda x: cumulative_log_ratio(x, old, mask), theta, w)
    _, g_cum_ref = _grad(
        lambda x: (torch.cumsum(ref_token_log_ratio(x, old, mask), -1).detach() + x - x.detach()).clamp(max=10.0),
        theta, w,
    )
    _close(g_cum, g_cum_ref)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("power", [0.5, -0.5])
def test_ctpo_la_matches_autograd(seed, power):
    theta, old, adv, mask = _data(seed, scale=0.1)
    log_rho = torch.cumsum(ref_token_log_ratio(theta, old, mask), -1)
    up = torch.randn_like(theta)
    kw = {"c_low": 0.025, "c_high": 0.05, "c_c": 0.05, "power": power}
    v, g = _grad(lambda x: ctpo_la_loss(x, adv, mask, **kw)[0], log_rho, up)
    v_ref, g_ref = _grad(lambda x: ref_ctpo_la(x, adv, mask, **kw), log_rho, up)
    _close(v, v_ref)
    _close(g, g_ref)
    _, metrics = ctpo_la_loss(log_rho, adv, mask, **kw)
    sigma = torch.cumsum(mask.long(), -1).clamp(min=1).to(DT) ** power
    _close(metrics["ctpo/la_scale_mean"], masked_mean(sigma, mask))
    _close(metrics["ctpo/clip_low_mean"], masked_mean(torch.exp(-0.025 * sigma), mask))
    _close(metrics["ctpo/clip_high_mean"], masked_mean(torch.exp(0.05 * sigma), mask))


@pytest.mark.parametrize("seed", [0, 1])
def test_kl_k3_matches_autograd_beyond_the_exponent_clamp(seed):
    theta, old, _, mask = _data(seed, scale=8.0)  # |z| > 10 on some tokens
    v, g = _grad(lambda x: kl_k3(x, old, mask), theta)
    v_ref, g_ref = _grad(lambda x: ref_kl_k3(x, old, mask), theta)
    _close(v, v_ref)
    _close(g, g_ref)
    assert ((theta - old).abs()[mask] > KL_EXP_CLAMP).any()


@pytest.mark.parametrize("seed", [0, 1])
def test_calibrl_guidance_and_rlplus_match_autograd(seed):
    theta, old, adv, mask = _data(seed)
    base = old - 0.2
    up = torch.randn_like(theta)
    for slope in (0.5, 0.1):
        v, g = _grad(lambda x, s=slope: calibrl_guidance_loss(x, base, adv, mask, slope=s), theta, up)
        v_ref, g_ref = _grad(lambda x, s=slope: ref_guidance(x, base, adv, mask, s), theta, up)
        _close(v, v_ref)
        _close(g, g_ref)
    lp = torch.where(mask, theta.clamp(max=-1e-3), theta)
    for power in (0.5, 1.0):
        v, g = _grad(lambda x, p=power: rlplus_off_policy_loss(x, old, adv, mask, exploration_power=p), lp, up)
        v_ref, g_ref = _grad(lambda x, p=power: ref_rlplus(x, old, adv, mask, p), lp, up)
        _close(v, v_ref)
        _close(g, g_ref)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(("eps", "kl"), [(0.2, 0.0), (0.2, 0.5), (math.inf, 0.0)])
def test_ppo_ewma_matches_autograd(seed, eps, kl):
    theta, old, adv, mask = _data(seed, scale=0.4)
    g = torch.Generator().manual_seed(seed + 10)
    ewma = old + 0.1 * torch.randn(old.shape, generator=g, dtype=DT)
    mu = old + 0.3 * torch.randn(old.shape, generator=g, dtype=DT)
    mu[0, 0] = old[0, 0] - 9.0  # pi / mu above imp_samp_max
    up = torch.randn_like(theta)
    kw = {"eps": eps, "imp_samp_max": 100.0, "kl_penalty": kl}
    v, gr = _grad(lambda x: ppo_ewma_loss(x, ewma, mu, adv, mask, **kw)[0], theta, up)
    v_ref, g_ref = _grad(lambda x: ref_ppo_ewma(x, ewma, mu, adv, mask, eps, 100.0, kl), theta, up)
    _close(v, v_ref)
    _close(gr, g_ref)


def test_masked_means_match_masked_mean():
    theta, old, _, mask = _data(4)
    x = torch.where(mask, theta - old, torch.zeros_like(theta))
    flag = x > 0
    got = masked_means({"x": x, "flag": flag, "flag_f": flag.to(DT)}, mask)
    _close(got["x"], masked_mean(x, mask))
    _close(got["flag"], masked_mean(flag.to(DT), mask))
    _close(got["flag_f"], got["flag"])
    empty = masked_means({"x": x}, torch.zeros_like(mask))
    assert empty["x"].item() == 0.0
