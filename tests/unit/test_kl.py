"""KL estimators: values vs loops, straight-through gradient, and every bias claim by exact enumeration."""

import math
import warnings

import pytest
import torch

from tether.objectives import kl as K

pytestmark = pytest.mark.unit
DT = torch.float64


def test_values_match_formulas():
    z = torch.tensor([-50.0, -3.0, -0.1, 0.0, 0.2, 4.0, 50.0], dtype=DT)
    for i, zi in enumerate(z.tolist()):
        assert K.k1(z)[i].item() == zi
        assert K.k2(z)[i].item() == pytest.approx(0.5 * zi * zi, rel=1e-12)
        e = math.exp(min(max(-zi, -10.0), 10.0))
        assert K.k3(z)[i].item() == pytest.approx(e - 1 + zi, rel=1e-12, abs=1e-12)
        assert K.k3plus(z)[i].item() == pytest.approx(e - 1 + zi, rel=1e-12, abs=1e-12)


def test_k3plus_has_k2_gradient():
    z = torch.randn(20, dtype=DT, requires_grad=True)
    (g_plus,) = torch.autograd.grad(K.k3plus(z).sum(), z)
    (g_k2,) = torch.autograd.grad(K.k2(z).sum(), z)
    torch.testing.assert_close(g_plus, g_k2, rtol=0, atol=0)


def categorical(seed):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(6, generator=g, dtype=DT, requires_grad=True)
    logp_ref = torch.log_softmax(torch.randn(6, generator=g, dtype=DT), -1)
    logp_mu = torch.log_softmax(theta.detach() + 0.7 * torch.randn(6, generator=g, dtype=DT), -1)
    return theta, logp_ref, logp_mu


def exact_kl_grad(theta, logp_ref):
    logp = torch.log_softmax(theta, -1)
    (g,) = torch.autograd.grad((logp.exp() * (logp - logp_ref)).sum(), theta)
    return g


def expected_grad(theta, logp_ref, estimator, placement):
    """E_{y~pi}[gradient of the estimator as used], by enumerating the 6 outcomes."""
    logp = torch.log_softmax(theta, -1)
    p = logp.exp().detach()
    mask = torch.ones(1, 6, dtype=torch.bool)
    if placement == "loss":
        k = K.kl_penalty_in_loss(logp[None], logp_ref[None], mask, estimator=estimator)[0]
        obj = (p * k).sum()
    else:  # reward r = -k, score-function loss -r log pi
        r = K.kl_penalty_in_reward(logp[None], logp_ref[None], mask, coef=1.0, estimator=estimator)[0]
        obj = (p * -r * logp).sum()
    (g,) = torch.autograd.grad(obj, theta)
    return g


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("placement", ["loss", "reward"])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "k3plus"])
def test_bias_claims_by_exact_enumeration(seed, placement, estimator):
    theta, logp_ref, _ = categorical(seed)
    want = exact_kl_grad(theta, logp_ref)
    got = expected_grad(theta, logp_ref, estimator, placement)
    unbiased = estimator in K.UNBIASED_IN[placement]
    if unbiased:
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    else:
        assert (got - want).norm() > 1e-3 * want.norm()


def test_k3_in_loss_is_the_forward_kl_gradient():
    theta, logp_ref, _ = categorical(3)
    logp = torch.log_softmax(theta, -1)
    (fwd,) = torch.autograd.grad((logp_ref.exp() * (logp_ref - logp)).sum(), theta)
    torch.testing.assert_close(expected_grad(theta, logp_ref, "k3", "loss"), fwd, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 4])
def test_importance_corrected_kl_is_unbiased_under_mu(seed):
    theta, logp_ref, logp_mu = categorical(seed)
    logp = torch.log_softmax(theta, -1)
    mu = logp_mu.exp()
    mask = torch.ones(1, 6, dtype=torch.bool)
    est = K.importance_corrected_kl(logp[None], logp_ref[None], logp_mu[None], mask)[0]
    value = (mu * est).sum()
    true_kl = (logp.exp() * (logp - logp_ref)).sum()
    assert value.item() == pytest.approx(true_kl.item(), rel=1e-10)
    (g,) = torch.autograd.grad(value, theta)
    torch.testing.assert_close(g, exact_kl_grad(theta, logp_ref), rtol=1e-10, atol=1e-12)


def test_warns_once_per_biased_combination_only():
    K._WARNED.clear()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert K.check_kl_combination("k3", "loss") is False
        assert K.check_kl_combination("k3", "loss") is False
        assert K.check_kl_combination("k2", "loss") is True
        assert K.check_kl_combination("k1", "reward") is True
        assert K.check_kl_combination("k1", "loss") is False
    assert len(w) == 2 and "k2, k3_is, k3plus" in str(w[0].message)
    with pytest.raises(ValueError, match="k3plus"):
        K.check_kl_combination("k4", "loss")
    with pytest.raises(ValueError, match="reward"):
        K.check_kl_combination("k1", "advantage")


def test_masked_positions_are_zero_and_gradcheck():
    g = torch.Generator().manual_seed(0)
    lp = (-torch.rand(2, 4, generator=g, dtype=DT)).requires_grad_(True)
    ref = -torch.rand(2, 4, generator=g, dtype=DT)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    out = K.kl_penalty_in_loss(lp, ref, mask, estimator="k3")
    assert (out[~mask] == 0).all()
    assert torch.autograd.gradcheck(lambda x: K.kl_penalty_in_loss(x, ref, mask, estimator="k3").sum(), (lp,))


@pytest.mark.parametrize("z", [25.0, -25.0])
def test_penalty_keeps_its_gradient_far_from_the_reference(z):
    """|z| = 25 is past the +-20 clamp: the value is clamped, the gradient is not cut (issue 12). With a
    plain clamp every estimator's gradient here was 0, so the tokens furthest from pi_ref felt no pull."""
    zc = max(-20.0, min(20.0, z))  # the value the estimators see
    e = math.exp(max(-10.0, min(10.0, -zc)))  # k3's clamped exponential
    want = {  # d k(z_c) / d z_c: the clamps pass the gradient through unchanged
        "k1": (zc, 1.0),
        "k2": (0.5 * zc * zc, zc),
        "k3": (e - 1.0 + zc, 1.0 - e),
        "k3plus": (e - 1.0 + zc, zc),
    }
    ref = torch.tensor([[-30.0, -0.5]], dtype=DT)
    mask = torch.tensor([[1, 0]], dtype=torch.bool)
    for name, (value, grad) in want.items():
        logp = (ref + torch.tensor([[z, 3.0]], dtype=DT)).requires_grad_(True)
        out = K.kl_penalty_in_loss(logp, ref, mask, estimator=name, coef=0.5)
        (g,) = torch.autograd.grad(out.sum(), logp)
        assert out[0, 0].item() == pytest.approx(0.5 * value, rel=1e-12), name
        assert g[0, 0].item() == pytest.approx(0.5 * grad, rel=1e-12), name
        if name != "k1":  # k1's gradient is the constant 1 (it does not regularise in the loss, see above)
            assert g[0, 0].item() * z > 0, name  # a descent step moves log pi back towards log pi_ref
        assert g[0, 1].item() == 0.0 and out[0, 1].item() == 0.0  # masked position
    # the reward placement is detached: only its value is clamped
    r = K.kl_penalty_in_reward(ref + z, ref, torch.ones(1, 2, dtype=torch.bool), coef=1.0, estimator="k1")
    assert r.tolist() == [[-zc, -zc]]


def test_clamp_straight_through_value_and_gradient():
    x = torch.tensor([-50.0, -20.0, -3.0, 0.0, 19.5, 20.0, float("inf")], dtype=DT, requires_grad=True)
    y = K.clamp_straight_through(x, 20.0)
    assert y.tolist() == [-20.0, -20.0, -3.0, 0.0, 19.5, 20.0, 20.0]
    (g,) = torch.autograd.grad((y * torch.arange(7, dtype=DT)).sum(), x)
    assert g.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    with torch.no_grad():
        assert K.clamp_straight_through(x, 1.0).tolist() == [-1.0, -1.0, -1.0, 0.0, 1.0, 1.0, 1.0]
