"""The rejection-mask presets (rejection, opsm, roll_infer) vs loop references written from their equations, their
gradients, the IS-corrected KL in the loss, and the advantage metrics."""

import math

import pytest
import torch

from tests.unit.test_core_objectives import make_batch, ref_ppo
from tether.objectives import LossInputs, get_preset
from tether.objectives.advantages import advantage_metrics, reinforce_pp
from tether.objectives.kl import check_kl_combination, importance_corrected_kl, kl_penalty_in_loss

pytestmark = pytest.mark.unit
DT = torch.float64


def batch(seed=0):
    logp_theta, logp_old, adv, mask = make_batch(B=6, T=7, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    scale = torch.linspace(0.02, 0.6, logp_old.shape[0], dtype=DT)[:, None]  # rows from near to far off-policy
    logp_mu = logp_old + scale * torch.randn(logp_old.shape, generator=g, dtype=DT)
    adv = adv[:, :1].expand_as(adv).clone()  # sequence advantages broadcast, as the loop gives them
    return logp_theta, logp_old, logp_mu, adv, mask


def loop_loss(logp_theta, logp_old, adv, mask, weight):
    """token-mean of weight * l^PPO (eps 0.2, dual clip 3) over loss tokens, written out."""
    total, n = 0.0, 0
    B, T = mask.shape
    for i in range(B):
        for t in range(T):
            if mask[i, t]:
                r = math.exp(logp_theta[i, t].item() - logp_old[i, t].item())
                total += weight[i][t] * ref_ppo(r, adv[i, t].item(), 0.2, 0.2, 3.0)
                n += 1
    return total / max(n, 1)


def loop_rejection_keep(logp_old, logp_mu, mask, estimator, level, high, low=None):
    B, T = mask.shape
    keep = []
    for i in range(B):
        toks = [t for t in range(T) if mask[i, t]]
        d = {t: logp_old[i, t].item() - logp_mu[i, t].item() for t in toks}
        k = {t: {"k1": d[t], "k2": 0.5 * d[t] ** 2, "k3": math.exp(d[t]) - 1 - d[t]}[estimator] for t in toks}
        if level == "token":
            stat = k
        else:
            vals = list(k.values())
            s = {"seq-sum": sum(vals), "seq-mean": sum(vals) / max(len(vals), 1),
                 "seq-max": max(vals, default=0.0)}[level]
            stat = {t: s for t in toks}
        if estimator == "k1":
            lo = 1 / high if low is None else low
            ok = {t: math.log(lo) <= stat[t] <= math.log(high) for t in toks}
        else:
            ok = {t: stat[t] <= high for t in toks}
        keep.append([1.0 if t in ok and ok[t] else 0.0 for t in range(T)])
    return keep


@pytest.mark.parametrize("estimator,level,high", [("k3", "seq-mean", 0.01), ("k3", "seq-mean", 0.05),
                                                  ("k1", "token", 1.3), ("k2", "seq-max", 0.05),
                                                  ("k1", "seq-sum", 2.0)])
def test_rejection_preset_matches_loop(estimator, level, high):
    logp_theta, logp_old, logp_mu, adv, mask = batch(seed=1)
    inp = LossInputs(logp_theta, logp_old, adv, mask, logp_mu_BT=logp_mu)
    loss, metrics = get_preset("rejection")(inp, estimator=estimator, level=level, high=high)
    keep = loop_rejection_keep(logp_old, logp_mu, mask, estimator, level, high)
    assert loss.item() == pytest.approx(loop_loss(logp_theta, logp_old, adv, mask, keep), rel=1e-10, abs=1e-12)
    kept = sum(keep[i][t] for i in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[i, t])
    assert metrics["rejection/maskfrac"].item() == pytest.approx(1 - kept / mask.sum().item(), abs=1e-12)
    assert 0 < metrics["rejection/maskfrac"].item() < 1  # the case rejects some tokens, not all


def test_opsm_preset_matches_loop():
    logp_theta, logp_old, logp_mu, adv, mask = batch(seed=2)
    delta = 0.05
    B, T = mask.shape
    keep = []
    for i in range(B):
        toks = [t for t in range(T) if mask[i, t]]
        kl = sum(logp_mu[i, t].item() - logp_theta[i, t].item() for t in toks) / max(len(toks), 1)
        keep.append([0.0 if (adv[i, t] < 0 and kl > delta) else 1.0 for t in range(T)])
    inp = LossInputs(logp_theta, logp_old, adv, mask, logp_mu_BT=logp_mu)
    loss, metrics = get_preset("opsm")(inp, delta=delta)
    assert loss.item() == pytest.approx(loop_loss(logp_theta, logp_old, adv, mask, keep), rel=1e-10, abs=1e-12)
    assert 0 < metrics["opsm/maskfrac"].item() < 1


def test_roll_infer_preset_matches_loop():
    logp_theta, logp_old, logp_mu, adv, mask = batch(seed=3)
    B, T = mask.shape
    weight = []
    for i in range(B):
        toks = [t for t in range(T) if mask[i, t]]
        rho = {t: math.exp(logp_old[i, t].item() - logp_mu[i, t].item()) for t in toks}
        seq = math.exp(sum(math.log(v) for v in rho.values()))
        vetoed = any(v < 0.5 for v in rho.values()) or not 0.5 <= seq <= 2.0
        weight.append([0.0 if t not in rho or vetoed or not 0.7 <= rho[t] <= 1.6 else min(rho[t], 1.5)
                       for t in range(T)])
    inp = LossInputs(logp_theta, logp_old, adv, mask, logp_mu_BT=logp_mu)
    loss, metrics = get_preset("roll_infer")(inp, is_max=1.5, token_reject=[0.7, 1.6], catastrophic=0.5,
                                             seq_reject="sequence", seq_bounds=[0.5, 2.0])
    assert loss.item() == pytest.approx(loop_loss(logp_theta, logp_old, adv, mask, weight), rel=1e-10, abs=1e-12)
    assert 0 < metrics["infer/rejectfrac"].item() < 1


def expected_weight(name, logp_theta, logp_old, logp_mu, adv, mask):
    """The detached per-token weight each preset should put on -A r, from its (loop-tested) building block."""
    from tether.objectives.decoupled import roll_infer_correction
    from tether.objectives.rollout_correction import divergence_rejection_mask, opsm_mask

    if name == "rejection":
        return divergence_rejection_mask(logp_old, logp_mu, mask, estimator="k3", agg="seq-mean", high=0.05).to(DT)
    if name == "opsm":
        return opsm_mask(logp_theta, logp_mu, adv, mask, delta=0.05).to(DT)
    w, keep, _ = roll_infer_correction(logp_old, logp_mu, mask, token_reject=(0.7, 1.6))
    return w * keep


@pytest.mark.parametrize("name,args", [("rejection", {"high": 0.05}), ("opsm", {"delta": 0.05}),
                                       ("roll_infer", {"token_reject": [0.7, 1.6]})])
def test_gradient_is_kept_weight_times_ppo_gradient(name, args):
    """Without a clip, d loss / d logp_theta = w_t keep_t (-A r_t) / N: the masks and weights carry no gradient."""
    logp_theta, logp_old, logp_mu, adv, mask = batch(seed=4)
    inp = LossInputs(logp_theta, logp_old, adv, mask, logp_mu_BT=logp_mu)
    loss, _ = get_preset(name)(inp, eps_low=math.inf, eps_high=math.inf, dual_clip_c=None, **args)
    (g,) = torch.autograd.grad(loss, logp_theta)
    w = expected_weight(name, logp_theta.detach(), logp_old, logp_mu, adv, mask)
    assert (w[mask] == 0).any() and (w[mask] > 0).any()  # the case drops some tokens and keeps others
    r = torch.exp(logp_theta.detach() - logp_old)
    torch.testing.assert_close(g, w * (-adv * r) / mask.sum() * mask, rtol=1e-12, atol=1e-14)


def test_gradcheck_smooth_region():
    logp_theta, logp_old, logp_mu, adv, mask = batch(seed=6)
    x0 = (logp_old + 0.01 * (logp_theta.detach() - logp_old)).requires_grad_(True)
    for name in ("rejection", "opsm", "roll_infer"):
        def f(x, name=name):
            return get_preset(name)(LossInputs(x, logp_old, adv, mask, logp_mu_BT=logp_mu))[0]

        assert torch.autograd.gradcheck(f, (x0,)), name


def test_kl_k3_is_in_the_loss_is_the_importance_corrected_kl():
    logp_theta, logp_old, logp_mu, _, mask = batch(seed=5)
    got = kl_penalty_in_loss(logp_theta, logp_old, mask, estimator="k3_is", coef=0.3, logp_mu_BT=logp_mu)
    torch.testing.assert_close(got, 0.3 * importance_corrected_kl(logp_theta, logp_old, logp_mu, mask))
    z = (logp_theta - logp_old).detach()
    want = torch.exp(logp_theta.detach() - logp_mu) * (torch.exp(-z) - 1 + z) * 0.3 * mask
    torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-14)
    (g,) = torch.autograd.grad(got.sum(), logp_theta)  # the ratio is differentiated: d/dx [e^(x - mu) k3(x - ref)]
    w = torch.exp(logp_theta.detach() - logp_mu)
    torch.testing.assert_close(g, 0.3 * w * ((torch.exp(-z) - 1 + z) + (1 - torch.exp(-z))) * mask,
                               rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="logp_mu_BT"):
        kl_penalty_in_loss(logp_theta, logp_old, mask, estimator="k3_is")
    assert check_kl_combination("k3_is", "loss")
    with pytest.raises(ValueError, match="placement loss"):
        check_kl_combination("k3_is", "reward")


def test_advantage_metrics_read_reinforce_pp_whitening():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    m = advantage_metrics(reinforce_pp(rewards, group))
    assert m["advantage/mean"].item() == pytest.approx(0.0, abs=1e-7)
    assert m["advantage/std"].item() == pytest.approx(1.0, abs=1e-5)
    a = torch.tensor([1.0, 3.0, 5.0])
    m = advantage_metrics(a, torch.tensor([True, False, True]))
    assert m["advantage/mean"].item() == 3.0 and m["advantage/std"].item() == pytest.approx(math.sqrt(8))
    assert advantage_metrics(a[:1])["advantage/std"].item() == 0.0
