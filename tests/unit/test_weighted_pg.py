"""CISPO and TOPR vs slow loop references and their stop-gradient semantics."""

from __future__ import annotations

import math

import pytest
import torch
from _ratio_family_data import clamp, exp, grad_of, make_inputs, rows, token_delta

from tether.objectives import LossInputs, aggregate, get_preset
from tether.objectives.weighted_pg import cispo_loss, topr_loss

pytestmark = pytest.mark.unit


def _close(a: torch.Tensor, b, rtol: float = 1e-10) -> None:
    b = torch.as_tensor(b, dtype=torch.float64)
    torch.testing.assert_close(a, b, rtol=rtol, atol=1e-12)


def ref_weighted(inputs: LossInputs, weight_fn) -> tuple[float, torch.Tensor]:
    """token-mean of -w A log pi with w = weight_fn(r, A) detached; gradient -w A / N_tok."""
    B, T = inputs.mask_BT.shape
    grad = torch.zeros(B, T, dtype=torch.float64)
    total, n = 0.0, 0
    for i, valid, th, old, adv in rows(inputs):
        for t in valid:
            w = weight_fn(exp(token_delta(th[t], old[t])), adv[t])
            total += -w * adv[t] * th[t]
            grad[i, t] = -w * adv[t]
            n += 1
    n = max(n, 1)
    return total / n, grad / n


def cispo_w(eps_low, eps_high):
    return lambda r, A: clamp(r, 1 - eps_low, 1 + eps_high)


def topr_w(r, A):
    return 1.0 if A > 0 else clamp(r, 0.0, 1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("eps", [(0.1, 0.1), (1.0, 0.28), (0.2, 5.0)])
def test_cispo_matches_loop_reference(seed, eps):
    inputs = make_inputs(seed)
    loss, metrics = get_preset("cispo")(inputs, eps_low=eps[0], eps_high=eps[1])
    ref_val, ref_grad = ref_weighted(inputs, cispo_w(*eps))
    _close(loss, ref_val)
    _close(grad_of(loss, inputs), ref_grad)
    assert all(not v.requires_grad for v in metrics.values())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_topr_matches_loop_reference(seed):
    inputs = make_inputs(seed)
    loss, metrics = get_preset("topr")(inputs)
    ref_val, ref_grad = ref_weighted(inputs, topr_w)
    _close(loss, ref_val)
    _close(grad_of(loss, inputs), ref_grad)
    assert all(not v.requires_grad for v in metrics.values())


def test_cispo_uses_detached_clipped_ratio():
    """The gradient is -sg(clip(r)) A grad log pi: no d r / d theta term (a differentiable ratio
    would add -A r log pi per token), and clipped tokens keep their gradient (unlike PPO)."""
    inputs = make_inputs(1, extreme=False, scale=0.6)
    per_tok, _ = cispo_loss(
        inputs.logp_theta_BT, inputs.logp_old_BT, inputs.advantages_BT, inputs.mask_BT, eps_low=0.1, eps_high=0.1
    )
    g = grad_of((per_tok * inputs.maskf_BT).sum(), inputs)
    r = torch.exp(inputs.logp_theta_BT.detach() - inputs.logp_old_BT)
    w = r.clamp(0.9, 1.1)
    _close(g, -w * inputs.advantages_BT * inputs.maskf_BT)
    clipped = inputs.mask_BT & (w != r) & (inputs.advantages_BT != 0)
    assert clipped.any() and torch.all(g[clipped] != 0)


def test_topr_positive_samples_are_plain_reinforce():
    inputs = make_inputs(2)
    pos = (inputs.advantages_BT > 0) & inputs.mask_BT
    per_tok, _ = topr_loss(inputs.logp_theta_BT, inputs.logp_old_BT, inputs.advantages_BT, inputs.mask_BT)
    _close(per_tok[pos], -inputs.advantages_BT[pos] * inputs.logp_theta_BT.detach()[pos])


def _roll_topr_per_token(logp_theta_BT, logp_old_BT, advantages_BT, scores_B):
    """ROLL's TOPR term (actor_pg_worker.py ``_compute_topr_loss``), restated: rows with ``score > 0``
    get ``-A log pi``, the others ``-sg(clip(r, 0, 1)) A log pi``."""
    r = torch.exp(logp_theta_BT.detach() - logp_old_BT).clamp(0.0, 1.0)
    w = torch.where((scores_B > 0)[:, None], torch.ones_like(r), r)
    return -w * advantages_BT * logp_theta_BT.detach()


def test_topr_split_matches_roll_for_binary_rewards_only():
    """tether splits on the advantage sign, ROLL on the reward sign: the same per-token loss for 0/1
    rewards with GRPO advantages, a different one for a graded reward below its group's mean."""
    from tether.objectives.advantages import grpo

    g = torch.Generator().manual_seed(0)
    group_B = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    old = -torch.rand(9, 5, generator=g, dtype=torch.float64) - 0.1
    theta = old + 0.3 * torch.randn(9, 5, generator=g, dtype=torch.float64)  # ratios on both sides of 1
    mask = torch.ones(9, 5, dtype=torch.bool)
    binary = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    graded = torch.tensor([0.3, 1.0, 0.9, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    for rewards, same in ((binary, True), (graded, False)):
        adv_BT = grpo(rewards, group_B)[:, None].expand(9, 5).contiguous()
        ours, _ = topr_loss(theta, old, adv_BT, mask)
        roll = _roll_topr_per_token(theta, old, adv_BT, rewards)
        assert torch.allclose(ours, roll, rtol=1e-12, atol=1e-12) is same
    # the graded case differs exactly on row 0: reward 0.3 > 0 (ROLL: weight 1) but below its group's mean
    adv_BT = grpo(graded, group_B)[:, None].expand(9, 5).contiguous()
    differs_B = ~torch.isclose(topr_loss(theta, old, adv_BT, mask)[0], _roll_topr_per_token(theta, old, adv_BT, graded),
                               rtol=1e-12, atol=1e-12).all(-1)
    assert differs_B.tolist() == [True] + [False] * 8


def test_cispo_with_infinite_eps_is_is_weighted_reinforce():
    a = make_inputs(4, extreme=False)
    loss, _ = get_preset("cispo")(a, eps_low=math.inf, eps_high=math.inf)
    r = torch.exp(a.logp_theta_BT.detach() - a.logp_old_BT)
    ref = aggregate(-r * a.advantages_BT * a.logp_theta_BT.detach(), a.mask_BT, "token-mean")
    _close(loss, ref)


@pytest.mark.parametrize("name", ["cispo", "topr"])
def test_on_policy_equals_reinforce(name):
    """With pi_theta = pi_old every weight is 1 (CISPO) or 1 / r = 1 (TOPR): REINFORCE exactly."""
    a, b = make_inputs(4), make_inputs(4)
    for x in (a, b):
        x.logp_old_BT = x.logp_theta_BT.detach().clone()
    la, _ = get_preset(name)(a)
    lb, _ = get_preset("reinforce")(b)
    _close(la, lb.detach())
    _close(grad_of(la, a), grad_of(lb, b))


def test_fully_masked_batch_is_zero():
    inputs = make_inputs(0, B=3, T=4, mask=torch.zeros(3, 4, dtype=torch.bool))
    for name in ["cispo", "topr"]:
        loss, metrics = get_preset(name)(inputs)
        assert loss.item() == 0.0
        assert torch.all(grad_of(loss, inputs) == 0)
        assert all(torch.isfinite(v) for v in metrics.values())
