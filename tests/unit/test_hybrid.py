"""CalibRL and RL-PLUS presets vs loop references, gradient semantics and no-expert reductions."""

from __future__ import annotations

import math

import pytest
import torch

from tether.objectives.hybrid import calibrl_guidance_loss, rlplus_off_policy_loss
from tether.objectives.inputs import LossInputs
from tether.objectives.registry import get_preset

pytestmark = pytest.mark.unit


def _data(seed, B=6, T=5, extreme=True):
    g = torch.Generator().manual_seed(seed)
    lp = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 3).requires_grad_(False)
    lo = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5
    lo = lo.clamp(max=0.0)
    le = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    A_B = torch.randn(B, generator=g, dtype=torch.float64)
    A_B[3] = 0.0
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[0] = True
    mask[1] = False  # empty row
    mask[4] = False
    mask[4, 0] = True  # length-1 row
    if extreme:
        lo[0, 0] = lp[0, 0] - 50.0  # ratio e^50 -> clamped at e^20
        lo[0, 1] = -0.0
        lp[0, 1] = -50.0
    expert = torch.zeros(B, dtype=torch.bool)
    expert[2] = True
    expert[5] = True
    return lp, lo, le, A_B, mask, expert


def _inputs(lp, lo, le, A_B, mask, expert):
    return LossInputs(
        logp_theta_BT=lp, logp_old_BT=lo, advantages_BT=A_B[:, None] * mask.to(lp.dtype), mask_BT=mask,
        expert_B=expert, logp_expert_old_BT=le,
    )


def _dual_clip(A, r, eps=0.2, c=3.0):
    l1, l2 = -A * r, -A * min(max(r, 1 - eps), 1 + eps)
    lc = max(l1, l2)
    return min(lc, -A * c) if A < 0 else lc


def ref_calibrl(lp, lo, le, A_B, mask, expert, coef=0.1):
    B, T = len(lp), len(lp[0])
    n_tok = sum(1 for b in range(B) for t in range(T) if mask[b, t])
    pg = g = 0.0
    for b in range(B):
        if expert[b]:
            continue
        A = A_B[b]
        s = 1.0 if A > 0 else -1.0
        for t in range(T):
            if not mask[b, t]:
                continue
            r = math.exp(min(max(lp[b][t] - lo[b][t], -20.0), 20.0))
            pg += _dual_clip(A, r)
            u = -s * (lp[b][t] - le[b][t])
            g += abs(A) * (u if u > 0 else 0.5 * u)
    return pg / max(n_tok, 1) + coef * g / max(n_tok, 1)


def ref_rl_plus(lp, lo, A_B, mask, expert):
    B, T = len(lp), len(lp[0])
    n_seq = sum(1 for b in range(B) if any(mask[b]))
    total = 0.0
    for b in range(B):
        A = A_B[b]
        for t in range(T):
            if not mask[b, t]:
                continue
            if expert[b]:
                p, po = math.exp(lp[b][t]), math.exp(lo[b][t])
                total += -(p / (0.75 * po + 0.25)) * A * math.sqrt(1.0 - p)
            else:
                total += -A * math.exp(min(max(lp[b][t] - lo[b][t], -20.0), 20.0))
    return total / (max(n_seq, 1) * T)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_calibrl_matches_loop_reference(seed):
    lp, lo, le, A_B, mask, expert = _data(seed)
    loss, metrics = get_preset("calibrl")(_inputs(lp, lo, le, A_B, mask, expert))
    want = ref_calibrl(lp.tolist(), lo.tolist(), le.tolist(), A_B.tolist(), mask, expert)
    assert loss.item() == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert {"calibrl/pg_loss", "calibrl/guided_loss", "pg/clipfrac_lower", "pg/ppo_kl"} <= set(metrics)
    assert all(not v.requires_grad for v in metrics.values())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_rl_plus_matches_loop_reference(seed):
    lp, lo, le, A_B, mask, expert = _data(seed)
    loss, metrics = get_preset("rl_plus")(_inputs(lp, lo, le, A_B, mask, expert))
    want = ref_rl_plus(lp.tolist(), lo.tolist(), A_B.tolist(), mask, expert)
    assert loss.item() == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert {"rlplus/off_pg_loss", "rlplus/on_pg_loss", "rlplus/off_ratio_mean"} <= set(metrics)


def test_calibrl_guidance_slopes():
    # one token per row: correct below / above baseline, incorrect above / below baseline
    base = torch.full((4, 1), -1.0, dtype=torch.float64)
    lp = torch.tensor([[-2.0], [-0.5], [-0.5], [-2.0]], dtype=torch.float64, requires_grad=True)
    A = torch.tensor([[0.8], [0.8], [-0.6], [-0.6]], dtype=torch.float64)
    mask = torch.ones(4, 1, dtype=torch.bool)
    g = calibrl_guidance_loss(lp, base, A, mask)
    (grad,) = torch.autograd.grad(g.sum(), lp)
    # correct: push up, slope 1 below the baseline, 0.5 above; incorrect: push down, 1 above, 0.5 below
    torch.testing.assert_close(grad[:, 0], torch.tensor([-0.8, -0.4, 0.6, 0.3], dtype=torch.float64))
    torch.testing.assert_close(g[:, 0], torch.tensor([0.8 * 1.0, 0.8 * -0.25, 0.6 * 0.5, 0.6 * -0.5],
                                                     dtype=torch.float64))


def test_calibrl_expert_rows_get_no_gradient():
    lp, lo, le, A_B, mask, expert = _data(0, extreme=False)
    lp = lp.clone().requires_grad_(True)
    loss, _ = get_preset("calibrl")(_inputs(lp, lo, le, A_B, mask, expert))
    (grad,) = torch.autograd.grad(loss, lp)
    assert torch.all(grad[expert] == 0)
    assert grad[~expert].abs().sum() > 0


def test_rl_plus_gradient_through_pi_theta_with_detached_exploration_factor():
    g = torch.Generator().manual_seed(5)
    lp = (-torch.rand(3, 4, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    lo = -torch.rand(3, 4, generator=g, dtype=torch.float64) * 2
    A = torch.randn(3, 1, generator=g, dtype=torch.float64).expand(3, 4)
    mask = torch.ones(3, 4, dtype=torch.bool)
    loss, r = rlplus_off_policy_loss(lp, lo, A, mask)
    (grad,) = torch.autograd.grad(loss.sum(), lp)
    p, po = lp.detach().exp(), lo.exp()
    # d/dlog p [-(p / (0.75 po + 0.25)) A sqrt(1 - sg(p))] = -A sqrt(1 - p) p / (0.75 po + 0.25)
    want = -A * torch.sqrt(1 - p) * p / (0.75 * po + 0.25)
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-14)
    # ... equivalently, w.r.t. the probability pi_theta itself the slope is -A^c / (0.75 pi_old + 0.25)
    p_leaf = p.clone().requires_grad_(True)
    loss_p, _ = rlplus_off_policy_loss(torch.log(p_leaf), lo, A, mask)
    (grad_p,) = torch.autograd.grad(loss_p.sum(), p_leaf)
    torch.testing.assert_close(grad_p, -A * torch.sqrt(1 - p) / (0.75 * po + 0.25), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(r.detach(), p / (0.75 * po + 0.25))


def test_no_expert_rows_reduce_to_ppo():
    lp, lo, le, A_B, mask, _ = _data(1)
    none = torch.zeros(lp.shape[0], dtype=torch.bool)
    for name, ppo_over in [
        ("rl_plus", {"agg": "seq-mean-token-sum-norm", "eps_low": math.inf, "eps_high": math.inf, "dual_clip_c": None}),
        ("calibrl", {"agg": "token-mean", "eps_low": 0.2, "eps_high": 0.2, "dual_clip_c": 3.0}),
    ]:
        a = lp.clone().requires_grad_(True)
        b = lp.clone().requires_grad_(True)
        over = {"guide_coef": 0.0} if name == "calibrl" else {}
        hyb, hm = get_preset(name)(_inputs(a, lo, le, A_B, mask, none), **over)
        ppo, _ = get_preset("ppo")(_inputs(b, lo, le, A_B, mask, none), **ppo_over)
        assert hyb.item() == pytest.approx(ppo.item(), rel=1e-12, abs=1e-14), name
        torch.testing.assert_close(torch.autograd.grad(hyb, a)[0], torch.autograd.grad(ppo, b)[0])
        if name == "rl_plus":
            assert hm["rlplus/off_pg_loss"].item() == 0.0


def test_calibrl_full_loss_is_ppo_plus_guidance_term():
    lp, lo, le, A_B, mask, _ = _data(2)
    none = torch.zeros(lp.shape[0], dtype=torch.bool)
    full, m = get_preset("calibrl")(_inputs(lp, lo, le, A_B, mask, none))
    ppo, _ = get_preset("ppo")(_inputs(lp, lo, le, A_B, mask, none))
    assert full.item() == pytest.approx(ppo.item() + 0.1 * m["calibrl/guided_loss"].item(), rel=1e-12)
    assert abs(m["calibrl/guided_loss"].item()) > 1e-3


def test_missing_inputs_raise():
    lp, lo, le, A_B, mask, expert = _data(0)
    bare = LossInputs(logp_theta_BT=lp, logp_old_BT=lo, advantages_BT=A_B[:, None] * mask, mask_BT=mask)
    with pytest.raises(ValueError, match="'calibrl' needs LossInputs.expert_B, logp_expert_old_BT"):
        get_preset("calibrl")(bare)
    with pytest.raises(ValueError, match="'rl_plus' needs LossInputs.expert_B"):
        get_preset("rl_plus")(bare)


def test_presets_use_dr_grpo_advantage():
    assert get_preset("calibrl").advantage == "dr_grpo"
    assert get_preset("rl_plus").advantage == "dr_grpo"
