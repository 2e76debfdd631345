"""ESS, P3O and P4O vs slow loop references; stop-gradient weight; micro-batch invariance with a global ESS."""

from __future__ import annotations

import math

import pytest
import torch
from _ratio_family_data import clamp, exp, grad_of, make_inputs, rows, token_delta

from tether.objectives import LossInputs, get_preset
from tether.objectives.ess import (
    effective_sample_size,
    ess_from_sums,
    ess_sums,
    kl_k3,
    mixture_log_prob,
    p3o_loss,
)

pytestmark = pytest.mark.unit


def _close(a: torch.Tensor, b, rtol: float = 1e-10) -> None:
    b = torch.as_tensor(b, dtype=torch.float64)
    torch.testing.assert_close(a.to(torch.float64), b, rtol=rtol, atol=1e-12)


# ---------------------------------------------------------------- references


def ref_ess(ws: list[float]) -> float:
    n = len(ws)
    if n == 0:
        return 1.0
    s1 = sum(ws)
    s2 = sum(w * w for w in ws)
    out = s1 * s1 / (n * s2 + 1e-8)
    return out if math.isfinite(out) else 1.0


def ref_k3(z: float) -> tuple[float, float]:
    """Value and d/dz of z + exp(clamp(-z, -10, 10)) - 1."""
    e = exp(clamp(-z, -10.0, 10.0))
    return z + e - 1.0, 1.0 - (e if -10.0 < -z < 10.0 else 0.0)


def ref_weights(inputs: LossInputs, other: torch.Tensor) -> list[float]:
    o = other.tolist()
    return [exp(token_delta(th[t], o[i][t])) for i, valid, th, _, _ in rows(inputs) for t in valid]


def ref_p3o(inputs: LossInputs, ess: float | None = None) -> tuple[float, torch.Tensor, float]:
    if ess is None:
        ess = ref_ess(ref_weights(inputs, inputs.logp_old_BT))
    B, T = inputs.mask_BT.shape
    grad = torch.zeros(B, T, dtype=torch.float64)
    total, n = 0.0, 0
    for i, valid, th, old, adv in rows(inputs):
        for t in valid:
            w = exp(token_delta(th[t], old[t]))
            wt = min(w, ess)
            k, dk = ref_k3(th[t] - old[t])
            total += -wt * adv[t] * th[t] + (1 - ess) * k
            grad[i, t] = -wt * adv[t] + (1 - ess) * dk
            n += 1
    n = max(n, 1)
    return total / n, grad / n, ess


def ref_p4o(inputs: LossInputs) -> tuple[float, torch.Tensor, float, float]:
    eb = ref_ess(ref_weights(inputs, inputs.logp_old_BT))
    ep = ref_ess(ref_weights(inputs, inputs.logp_prox_BT))
    emix = min(eb, ep)
    ab, ap = 1 - eb, 1 - ep
    prox = inputs.logp_prox_BT.tolist()
    B, T = inputs.mask_BT.shape
    grad = torch.zeros(B, T, dtype=torch.float64)
    total, n = 0.0, 0
    for i, valid, th, old, adv in rows(inputs):
        for t in valid:
            w = exp(token_delta(th[t], old[t]))
            wt = min(w, emix)
            log_mix = math.log(ab * exp(old[t]) + ap * exp(prox[i][t])) - math.log(ab + ap)
            k, dk = ref_k3(th[t] - log_mix)
            coef = (1 - emix) if (1 - emix) > 1e-6 else 0.0
            total += -wt * adv[t] * th[t] + coef * k
            grad[i, t] = -wt * adv[t] + coef * dk
            n += 1
    n = max(n, 1)
    return total / n, grad / n, eb, ep


# ---------------------------------------------------------------- ESS


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("extreme", [False, True])
def test_ess_matches_loop_reference(seed, extreme):
    inputs = make_inputs(seed, extreme=extreme)
    w = torch.exp((inputs.logp_theta_BT - inputs.logp_old_BT).clamp(-20, 20))
    ess = effective_sample_size(w, inputs.mask_BT)
    assert ess.dtype == torch.float64 and ess.dim() == 0 and not ess.requires_grad
    _close(ess, ref_ess(ref_weights(inputs, inputs.logp_old_BT)))
    n = inputs.mask_BT.sum().item()
    assert 1.0 / n - 1e-12 <= ess.item() <= 1.0


def test_ess_fallbacks_and_extremes():
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    assert effective_sample_size(w, torch.zeros(2, 2, dtype=torch.bool)).item() == 1.0
    inf = torch.tensor([[math.inf, 1.0]], dtype=torch.float64)
    assert effective_sample_size(inf, torch.ones(1, 2, dtype=torch.bool)).item() == 1.0
    nan = torch.tensor([[math.nan, 1.0]], dtype=torch.float64)
    assert effective_sample_size(nan, torch.ones(1, 2, dtype=torch.bool)).item() == 1.0
    # one dominant weight -> ESS ~ 1/n; equal weights -> ESS ~ 1; padding ignored
    big = torch.tensor([[math.exp(20.0), 1e-9, 1e-9, 1e-9, 123.0]], dtype=torch.float64)
    m = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    _close(effective_sample_size(big, m), 0.25, rtol=1e-9)
    _close(effective_sample_size(torch.full((3, 4), 7.0, dtype=torch.float64), torch.ones(3, 4)), 1.0, rtol=1e-9)
    # float32 weights are promoted: the float64 sums of 1e20-sized values stay finite
    w32 = torch.tensor([[1e20, 1e20]], dtype=torch.float32)
    _close(effective_sample_size(w32, torch.ones(1, 2, dtype=torch.bool)), 1.0, rtol=1e-9)


def test_ess_sums_are_additive_over_micro_batches():
    inputs = make_inputs(5, B=9)
    w = torch.exp((inputs.logp_theta_BT.detach() - inputs.logp_old_BT).clamp(-20, 20))
    whole = effective_sample_size(w, inputs.mask_BT)
    parts = sum(ess_sums(w[s], inputs.mask_BT[s]) for s in (slice(0, 2), slice(2, 7), slice(7, 9)))
    _close(ess_from_sums(parts), whole, rtol=1e-12)


# ---------------------------------------------------------------- P3O


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("extreme", [False, True])
def test_p3o_matches_loop_reference(seed, extreme):
    inputs = make_inputs(seed, extreme=extreme)
    loss, metrics = get_preset("p3o")(inputs)
    ref_val, ref_grad, ref_e = ref_p3o(inputs)
    _close(loss, ref_val)
    _close(grad_of(loss, inputs), ref_grad)
    _close(metrics["p3o/ess"], ref_e)
    assert all(not v.requires_grad for v in metrics.values())


def test_p3o_weight_is_stop_gradient_min_r_ess():
    """Policy term alone (ESS given as 1 switches off the trust region): gradient -min(r, ESS) A."""
    inputs = make_inputs(6, extreme=False, scale=0.5)
    per_tok, m = p3o_loss(inputs.logp_theta_BT, inputs.logp_old_BT, inputs.advantages_BT, inputs.mask_BT, ess=1.0)
    g = grad_of((per_tok * inputs.maskf_BT).sum(), inputs)
    r = torch.exp(inputs.logp_theta_BT.detach() - inputs.logp_old_BT)
    _close(g, -torch.clamp(r, max=1.0) * inputs.advantages_BT * inputs.maskf_BT)
    # with the batch ESS the cap binds on some tokens and the weight never exceeds ESS
    inputs = make_inputs(6, extreme=False, scale=0.5)
    per_tok, m = p3o_loss(inputs.logp_theta_BT, inputs.logp_old_BT, inputs.advantages_BT, inputs.mask_BT)
    ess = m["p3o/ess"]
    assert 0 < ess.item() < 1 and (r[inputs.mask_BT] > ess).any()
    k3_grad = (1 - ess) * (1 - 1 / r)
    g = grad_of((per_tok * inputs.maskf_BT).sum(), inputs)
    _close(g, (-torch.minimum(r, ess) * inputs.advantages_BT + k3_grad) * inputs.maskf_BT)


def test_p3o_all_ratios_one_is_reinforce():
    a, b = make_inputs(7), make_inputs(7)
    for x in (a, b):
        x.logp_old_BT = x.logp_theta_BT.detach().clone()
    la, metrics = get_preset("p3o")(a)
    lb, _ = get_preset("reinforce")(b)
    # ESS = n^2/(n^2 + 1e-8): 1 to ~1e-10 relative, the k3 term is 0 with gradient 0 at r = 1
    assert abs(metrics["p3o/ess"].item() - 1.0) < 1e-9
    _close(la, lb.detach(), rtol=1e-8)
    _close(grad_of(la, a), grad_of(lb, b), rtol=1e-8)


def test_p3o_global_ess_makes_micro_batching_exact():
    """Summed micro-batch losses (global N_tok, precomputed global ESS) equal the whole-batch loss."""
    inputs = make_inputs(8, B=9)
    whole, _ = get_preset("p3o")(inputs)
    g_whole = grad_of(whole, inputs)
    w = torch.exp((inputs.logp_theta_BT.detach() - inputs.logp_old_BT).clamp(-20, 20))
    ess = effective_sample_size(w, inputs.mask_BT)
    n_tok = inputs.mask_BT.sum()
    total = 0.0
    for s in (slice(0, 3), slice(3, 4), slice(4, 9)):
        mb = LossInputs(
            logp_theta_BT=inputs.logp_theta_BT[s], logp_old_BT=inputs.logp_old_BT[s],
            advantages_BT=inputs.advantages_BT[s], mask_BT=inputs.mask_BT[s], num_tokens=n_tok,
        )
        total = total + get_preset("p3o")(mb, ess=ess)[0]
    _close(total.detach(), whole.detach(), rtol=1e-12)
    _close(grad_of(total, inputs), g_whole, rtol=1e-12)
    # without the global ESS the split changes the loss (the reason for the hyper-parameter)
    local = sum(
        get_preset("p3o")(LossInputs(
            logp_theta_BT=inputs.logp_theta_BT[s], logp_old_BT=inputs.logp_old_BT[s],
            advantages_BT=inputs.advantages_BT[s], mask_BT=inputs.mask_BT[s], num_tokens=n_tok,
        ))[0].detach()
        for s in (slice(0, 3), slice(3, 4), slice(4, 9))
    )
    assert abs(local.item() - whole.item()) > 1e-6


def test_kl_k3_gradcheck_and_reference():
    gen = torch.Generator().manual_seed(3)
    lp = (-2 * torch.rand(3, 5, generator=gen, dtype=torch.float64)).requires_grad_(True)
    anchor = -2 * torch.rand(3, 5, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda x: kl_k3(x, anchor, mask), (lp,))
    for z in (-50.0, -10.5, -3.0, 0.0, 0.7, 12.0, 50.0):
        v = kl_k3(torch.tensor([[z]], dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64),
                  torch.ones(1, 1, dtype=torch.bool))
        _close(v[0, 0], ref_k3(z)[0])


# ---------------------------------------------------------------- P4O


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("extreme", [False, True])
def test_p4o_matches_loop_reference(seed, extreme):
    inputs = make_inputs(seed, extreme=extreme, prox=True)
    loss, metrics = get_preset("p4o")(inputs)
    ref_val, ref_grad, eb, ep = ref_p4o(inputs)
    _close(loss, ref_val)
    _close(grad_of(loss, inputs), ref_grad)
    _close(metrics["p4o/ess_b"], eb)
    _close(metrics["p4o/ess_prox"], ep)
    _close(metrics["p4o/ess_mix"], min(eb, ep))
    assert all(not v.requires_grad for v in metrics.values())


def test_p4o_trust_region_skipped_near_ess_one_and_requires_prox():
    a, b = make_inputs(9, prox=True), make_inputs(9)
    for x in (a, b):
        x.logp_old_BT = x.logp_theta_BT.detach().clone()
    a.logp_prox_BT = a.logp_old_BT.clone()
    la, m = get_preset("p4o")(a)
    lb, _ = get_preset("reinforce")(b)
    assert m["p4o/ess_mix"].item() > 1 - 1e-6
    _close(la, lb.detach(), rtol=1e-8)
    _close(grad_of(la, a), grad_of(lb, b), rtol=1e-8)
    with pytest.raises(ValueError, match="logp_prox_BT"):
        get_preset("p4o")(make_inputs(0))


def test_mixture_anchor_edge_weights():
    old = torch.log(torch.tensor([[0.2, 0.5]], dtype=torch.float64))
    prox = torch.log(torch.tensor([[0.6, 0.1]], dtype=torch.float64))
    one = torch.tensor(1.0, dtype=torch.float64)
    # only the proximal ESS is below 1 -> the anchor is pi_prox; both 1 -> fallback pi_old
    _close(mixture_log_prob(old, prox, one, torch.tensor(0.3, dtype=torch.float64)), prox)
    _close(mixture_log_prob(old, prox, one, one), old)
    mix = mixture_log_prob(old, prox, torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.75, dtype=torch.float64))
    _close(torch.exp(mix), (0.5 * torch.exp(old) + 0.25 * torch.exp(prox)) / 0.75)


def test_fully_masked_batch_is_zero():
    inputs = make_inputs(0, B=3, T=4, mask=torch.zeros(3, 4, dtype=torch.bool), prox=True)
    for name in ["p3o", "p4o"]:
        loss, metrics = get_preset(name)(inputs)
        assert loss.item() == 0.0
        assert torch.all(grad_of(loss, inputs) == 0)
        assert all(torch.isfinite(v) for v in metrics.values())
