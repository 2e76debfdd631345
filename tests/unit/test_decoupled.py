"""Decoupled PPO, ROLL correction order, log-linear prox, PPO-EWMA and DPPO vs loop references."""

from __future__ import annotations

import math

import pytest
import torch

from tether.objectives import LossInputs, aggregate, get_preset
from tether.objectives import decoupled as dc
from tether.objectives.policy_gradient import ppo_clip_loss
from tether.objectives.ratios import token_log_ratio

pytestmark = pytest.mark.unit

RTOL = 1e-9
ATOL = 1e-12
CLAMP = 20.0

MASK_ROWS = [
    [0, 0, 0, 0, 0, 0],  # empty row
    [1, 0, 0, 0, 0, 0],  # length 1
    [1, 1, 1, 1, 1, 1],
    [1, 1, 1, 0, 0, 0],
    [1, 0, 1, 1, 0, 1],  # holes
]


def make_batch(seed: int, *, extreme: bool = True, spread: float = 0.3, empty: bool = False):
    g = torch.Generator().manual_seed(seed)
    B, T = len(MASK_ROWS), len(MASK_ROWS[0])
    mask = torch.zeros(B, T, dtype=torch.float64) if empty else torch.tensor(MASK_ROWS, dtype=torch.float64)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2.5 - 0.02
    theta = (old + spread * torch.randn(B, T, generator=g, dtype=torch.float64)).clamp(max=-1e-4)
    prox = (old + 0.5 * spread * torch.randn(B, T, generator=g, dtype=torch.float64)).clamp(max=-1e-4)
    mu = (old + 2 * spread * torch.randn(B, T, generator=g, dtype=torch.float64)).clamp(max=-1e-4)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    if extreme:
        mu[2, 1] = prox[2, 1] - 50.0  # pi_prox / mu = e^50
        mu[4, 2] = 0.0
        prox[4, 2] = -50.0  # e^-50
        old[4, 2] = -50.0
        theta[2, 4] = old[2, 4] - 50.0  # pi_theta / pi_old = e^-50
    pad = mask == 0
    mu = torch.where(pad, torch.full_like(mu, 3e3), mu)
    prox = torch.where(pad, torch.full_like(prox, -3e3), prox)
    return theta, old, prox, mu, adv, mask


def rows(mask):
    return [[t for t in range(mask.shape[1]) if mask[i, t]] for i in range(mask.shape[0])]


def cl(x):
    return max(-CLAMP, min(CLAMP, x))


def close(a, b, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               rtol=rtol, atol=atol)


def ppo_tok(r, A, eps_low, eps_high, c):
    l = max(-A * r, -A * min(max(r, 1 - eps_low), 1 + eps_high))
    if c is not None and A < 0:
        l = min(l, -A * c)
    return l


def token_mean(vals_BT, mask):
    n = sum(len(ts) for ts in rows(mask))
    return sum(vals_BT[i][t] for i, ts in enumerate(rows(mask)) for t in ts) / max(n, 1)


def grad_of(fn, theta):
    th = theta.clone().requires_grad_()
    out = fn(th)
    (g,) = torch.autograd.grad(out, th)
    return out.detach(), g


SEEDS = [0, 1, 2]


# ------------------------------------------------------------------------------------------------
# decoupled PPO


def ref_behave(prox, mu, mask, cap, mode):
    B, T = mask.shape
    w = [[0.0] * T for _ in range(B)]
    for i, ts in enumerate(rows(mask)):
        for t in ts:
            x = math.exp(cl(float(prox[i, t]) - float(mu[i, t])))
            if cap is not None and x > cap:
                x = 0.0 if mode == "mask" else cap
            w[i][t] = x
    return w


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("cap", "mode"), [(None, "mask"), (5.0, "mask"), (2.0, "clamp")])
@pytest.mark.parametrize("dual", [None, 3.0])
def test_decoupled_ppo_loss_matches_loop(seed, cap, mode, dual):
    theta, _, prox, mu, adv, mask = make_batch(seed)
    w = ref_behave(prox, mu, mask, cap, mode)

    def f(th):
        loss, _ = dc.decoupled_ppo_loss(th, prox, mu, adv, mask, eps_low=0.2, eps_high=0.28,
                                        dual_clip_c=dual, behave_cap=cap, cap_mode=mode)
        return aggregate(loss, mask, "token-mean")

    loss, g = grad_of(f, theta)
    ref = [[0.0] * mask.shape[1] for _ in range(mask.shape[0])]
    for i, ts in enumerate(rows(mask)):
        for t in ts:
            r = math.exp(cl(float(theta[i, t]) - float(prox[i, t])))
            ref[i][t] = w[i][t] * ppo_tok(r, float(adv[i, t]), 0.2, 0.28, dual)
    close(loss, token_mean(ref, mask))
    # gradient = w * gradient of PPO clipped around pi_prox
    th = theta.clone().requires_grad_()
    l_ppo, _ = ppo_clip_loss(token_log_ratio(th, prox, mask), adv, mask, eps_low=0.2, eps_high=0.28, dual_clip_c=dual)
    (g_ppo,) = torch.autograd.grad(aggregate(l_ppo, mask, "token-mean"), th)
    close(g, torch.tensor(w, dtype=torch.float64) * g_ppo)


def test_decoupled_ppo_with_prox_equal_mu_is_ppo_around_prox():
    theta, _, prox, _, adv, mask = make_batch(0, extreme=False)
    inp = LossInputs(logp_theta_BT=theta, logp_old_BT=prox, advantages_BT=adv, mask_BT=mask,
                     logp_mu_BT=prox, logp_prox_BT=prox)
    a, _ = get_preset("decoupled_ppo")(inp)
    b, _ = get_preset("ppo")(inp, dual_clip_c=None)
    close(a, b)


def test_decoupled_ppo_preset_matches_function_and_gradcheck():
    theta, old, prox, mu, adv, mask = make_batch(1, extreme=False)
    th = theta.clone().requires_grad_()
    inp = LossInputs(logp_theta_BT=th, logp_old_BT=old, advantages_BT=adv, mask_BT=mask,
                     logp_mu_BT=mu, logp_prox_BT=prox)
    loss, metrics = get_preset("decoupled_ppo")(inp)
    ref, _ = dc.decoupled_ppo_loss(theta, prox, mu, adv, mask, behave_cap=5.0)
    close(loss.detach(), aggregate(ref, mask, "token-mean"))
    for k, v in metrics.items():
        assert v.dim() == 0 and not v.requires_grad and torch.isfinite(v), k

    def f(x):
        return dc.decoupled_ppo_loss(x, prox, mu, adv, mask, behave_cap=5.0)[0].sum()

    assert torch.autograd.gradcheck(f, (theta.clone().requires_grad_(),))


@pytest.mark.parametrize(("name", "missing"), [
    ("decoupled_ppo", "logp_prox_BT"), ("decoupled_ppo", "logp_mu_BT"),
    ("ppo_ewma", "logp_prox_BT"), ("ppo_ewma", "logp_mu_BT"),
])
def test_missing_inputs_name_the_field(name, missing):
    theta, old, prox, mu, adv, mask = make_batch(0)
    fields = {"logp_prox_BT": prox, "logp_mu_BT": mu}
    fields.pop(missing)
    inp = LossInputs(logp_theta_BT=theta, logp_old_BT=old, advantages_BT=adv, mask_BT=mask, **fields)
    with pytest.raises(ValueError, match=rf"'{name}' needs LossInputs\.{missing}"):
        get_preset(name)(inp)
    with pytest.raises(ValueError, match=missing):
        get_preset(name).fn(inp, **get_preset(name).defaults)


# ------------------------------------------------------------------------------------------------
# ROLL correction order


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("is_level", ["token", "sequence", None])
@pytest.mark.parametrize("token_reject", [None, (0.5, 2.0)])
@pytest.mark.parametrize("catastrophic", [None, 1e-4, 0.6])
@pytest.mark.parametrize("seq_reject", [None, "sequence", "geometric"])
def test_roll_infer_correction_matches_loop(seed, is_level, token_reject, catastrophic, seq_reject):
    _, old, _, mu, _, mask = make_batch(seed, spread=0.2)
    w, keep, m = dc.roll_infer_correction(
        old, mu, mask, is_level=is_level, is_min=0.1, is_max=2.0, token_reject=token_reject,
        catastrophic=catastrophic, seq_reject=seq_reject, seq_bounds=(0.5, 3.0),
    )
    B, T = mask.shape
    n = n_rej = 0
    for i, ts in enumerate(rows(mask)):
        d = {t: cl(float(old[i, t]) - float(mu[i, t])) for t in ts}
        s = sum(d.values())
        cat = catastrophic is not None and any(math.exp(x) < catastrophic for x in d.values())
        sx = s / len(ts) if (seq_reject == "geometric" and ts) else s
        seq_bad = seq_reject is not None and not (math.log(0.5) <= sx <= math.log(3.0))
        for t in range(T):
            if t not in ts:
                assert not keep[i, t] and w[i, t] == 0
                continue
            n += 1
            if is_level is None:
                w_ref = 1.0
            elif is_level == "token":
                w_ref = min(2.0, max(0.1, math.exp(d[t])))
            else:
                w_ref = min(2.0, max(0.1, math.exp(cl(s))))
            close(w[i, t], w_ref)
            tok_bad = token_reject is not None and not (
                math.log(token_reject[0]) <= d[t] <= math.log(token_reject[1]))
            k = not (tok_bad or cat or seq_bad)
            n_rej += not k
            assert bool(keep[i, t]) == k
    close(m["infer/rejectfrac"], n_rej / n)


def test_roll_infer_correction_rejects_bad_options():
    _, old, _, mu, _, mask = make_batch(0)
    with pytest.raises(ValueError, match="seq_reject"):
        dc.roll_infer_correction(old, mu, mask, seq_reject="geo")
    with pytest.raises(ValueError, match="is_level"):
        dc.roll_infer_correction(old, mu, mask, is_level="geometric")


# ------------------------------------------------------------------------------------------------
# AReaL log-linear proximal approximation


def test_loglinear_prox_matches_loop():
    theta, _, _, mu, _, mask = make_batch(2, extreme=False)
    versions = torch.tensor([[-1, -1, 3, 4, 5, 5], [5, 2, 2, 0, 1, 4], [0, 1, 2, 3, 4, 5],
                             [5, 5, 5, -1, -1, -1], [2, 3, 3, 4, 4, 5]])
    for v_theta, v_prox in [(5, None), (5, 3), (6, 4)]:
        out = dc.loglinear_prox_logp(theta, mu, versions, v_theta=v_theta, v_prox=v_prox)
        vp = v_theta - 1 if v_prox is None else v_prox
        for i in range(versions.shape[0]):
            for t in range(versions.shape[1]):
                v = int(versions[i, t])
                a = (vp - v) / (v_theta - v) if (v_theta - v > 0 and v >= 0) else 0.0
                a = min(1.0, max(0.0, a))
                close(out[i, t], float(mu[i, t]) + a * (float(theta[i, t]) - float(mu[i, t])))


def test_loglinear_prox_endpoints():
    theta, _, _, mu, _, _ = make_batch(0, extreme=False)
    v = torch.full(theta.shape, 4)
    close(dc.loglinear_prox_logp(theta, mu, v, v_theta=5), mu)  # behaviour one step behind = prox
    close(dc.loglinear_prox_logp(theta, mu, v, v_theta=5, v_prox=5), theta)  # prox = current
    assert not dc.loglinear_prox_logp(theta.requires_grad_(), mu, v, v_theta=5).requires_grad


# ------------------------------------------------------------------------------------------------
# PPO-EWMA


def ref_ppo_ewma(theta, ewma, mu, adv, mask, eps, ism, kl):
    B, T = mask.shape
    out = [[0.0] * T for _ in range(B)]
    for i, ts in enumerate(rows(mask)):
        for t in ts:
            lp, le, lm, A = float(theta[i, t]), float(ewma[i, t]), float(mu[i, t]), float(adv[i, t])
            adj = max(lm, lp - math.log(ism))
            l1 = -A * math.exp(lp - adj)
            c = min(max(lp - le, math.log(1 - eps)), math.log(1 + eps))
            l2 = -A * math.exp(c + le - adj)
            out[i][t] = max(l1, l2) + kl * 0.5 * (lp - le) ** 2
    return out


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("eps", "ism", "kl"), [(0.2, 100.0, 0.0), (0.1, 2.0, 0.5)])
def test_ppo_ewma_loss_matches_loop(seed, eps, ism, kl):
    theta, _, ewma, mu, adv, mask = make_batch(seed)
    loss_BT, m = dc.ppo_ewma_loss(theta, ewma, mu, adv, mask, eps=eps, imp_samp_max=ism, kl_penalty=kl)
    ref = ref_ppo_ewma(theta, ewma, mu, adv, mask, eps, ism, kl)
    close(aggregate(loss_BT, mask, "token-mean"), token_mean(ref, mask))
    vals = [(i, t) for i, ts in enumerate(rows(mask)) for t in ts]
    frac = sum(float(mu[i, t]) < float(theta[i, t]) - math.log(ism) for i, t in vals) / len(vals)
    close(m["ppo_ewma/imp_samp_clipfrac"], frac)
    close(m["ppo_ewma/approxkl"], sum(0.5 * (float(theta[i, t]) - float(ewma[i, t])) ** 2 for i, t in vals) / len(vals))


def test_ppo_ewma_gradient_and_cap():
    theta, _, ewma, mu, adv, mask = make_batch(1, extreme=False)

    def f(x):
        return dc.ppo_ewma_loss(x, ewma, mu, adv, mask)[0].sum()

    assert torch.autograd.gradcheck(f, (theta.clone().requires_grad_(),))
    # the l1 branch: gradient is -A * min(pi/mu, 100) * grad log pi, never more than 100x
    th = theta.clone().requires_grad_()
    big_mu = mu - 10.0  # pi/mu ~ e^10 > 100
    loss_BT, m = dc.ppo_ewma_loss(th, th.detach(), big_mu, adv.abs(), mask, eps=math.inf)
    (g,) = torch.autograd.grad(loss_BT.sum(), th)
    close(g, -adv.abs() * 100.0 * mask)
    close(m["ppo_ewma/imp_samp_clipfrac"], 1.0)


def test_ppo_ewma_preset_and_equivalence_to_decoupled_without_caps():
    # with pi_ewma/mu < imp_samp_max and nothing clipped, PPO-EWMA = decoupled PPO with prox = ewma
    theta, old, ewma, mu, adv, mask = make_batch(2, extreme=False, spread=0.02)
    inp = LossInputs(logp_theta_BT=theta, logp_old_BT=old, advantages_BT=adv, mask_BT=mask,
                     logp_mu_BT=mu, logp_prox_BT=ewma)
    a, ma = get_preset("ppo_ewma")(inp)
    b, _ = get_preset("decoupled_ppo")(inp, behave_cap=None)
    assert float(ma["ppo_ewma/clipfrac"]) == 0.0
    close(a, b)


def test_ewma_update_matches_weighted_average():
    g = torch.Generator().manual_seed(0)
    beta = 0.7
    shapes = [(3, 2), (4,)]
    history = [[torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(5)]
    ewma, W = [torch.zeros(s, dtype=torch.float64) for s in shapes], 0.0
    for k, params in enumerate(history):
        before = [e.clone() for e in ewma]
        ewma, W = dc.ewma_update(ewma, params, W, beta=beta)
        n = k + 1
        weights = [beta ** (n - 1 - j) for j in range(n)]
        close(W, sum(weights))
        for p_idx in range(len(shapes)):
            expected = sum(wj * history[j][p_idx] for j, wj in enumerate(weights)) / sum(weights)
            close(ewma[p_idx], expected)
        if k:
            assert not torch.equal(before[0], ewma[0])  # inputs were not modified in place ...
    # ... and W = 0 (reset) gives theta_ewma = theta
    out, W1 = dc.ewma_update(ewma, history[0], 0.0, beta=beta)
    assert W1 == 1.0
    close(out[0], history[0][0])


def test_ewma_update_errors():
    with pytest.raises(ValueError, match="2 EWMA tensors but 1"):
        dc.ewma_update([torch.zeros(1), torch.zeros(1)], [torch.zeros(1)], 0.0, beta=0.5)
    with pytest.raises(ValueError, match="beta"):
        dc.ewma_update([torch.zeros(1)], [torch.zeros(1)], 0.0, beta=1.5)


# ------------------------------------------------------------------------------------------------
# DPPO


def ref_dppo(theta, old, adv, mask, kind, dl, dh, cap):
    B, T = mask.shape
    loss = [[0.0] * T for _ in range(B)]
    keep = [[False] * T for _ in range(B)]
    grad_coef = [[0.0] * T for _ in range(B)]
    for i, ts in enumerate(rows(mask)):
        for t in ts:
            lp, lq, A = float(theta[i, t]), float(old[i, t]), float(adv[i, t])
            p, q = math.exp(lp), math.exp(lq)
            if kind == "tv":
                k = (p - q <= dh) if A > 0 else (p - q >= -dl)
            else:
                d = q * (lq - lp) + (1 - q) * math.log((1 - q + 1e-8) / (1 - p + 1e-8))
                k = (d <= dh or p <= q) if A > 0 else (d <= dl or p >= q)
            w = min(math.exp(cl(lp - lq)), cap)
            keep[i][t] = k
            loss[i][t] = -A * w * lp if k else 0.0
            grad_coef[i][t] = -A * w if k else 0.0
    return loss, keep, grad_coef


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("kind", "dl", "dh"), [("tv", 0.15, 0.15), ("tv", 0.05, 0.1), ("kl", 0.05, 0.05),
                                                 ("kl", 0.01, 0.2)])
@pytest.mark.parametrize("cap", [20.0, 1.1])
def test_dppo_matches_loop(seed, kind, dl, dh, cap):
    theta, old, _, _, adv, mask = make_batch(seed, spread=0.6)

    def f(th):
        loss, _ = dc.dppo_loss(th, old, adv, mask, divergence=kind, delta_low=dl, delta_high=dh, ratio_cap=cap)
        return aggregate(loss, mask, "token-mean")

    loss, g = grad_of(f, theta)
    ref_loss, ref_keep, coef = ref_dppo(theta, old, adv, mask, kind, dl, dh, cap)
    close(loss, token_mean(ref_loss, mask))
    n = sum(len(ts) for ts in rows(mask))
    close(g, torch.tensor(coef, dtype=torch.float64) / n)
    keep = dc.dppo_valid_mask(theta, old, adv, mask, divergence=kind, delta_low=dl, delta_high=dh)
    assert keep.tolist() == ref_keep


def test_dppo_masks_only_in_the_advantage_direction():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5, 0.5]], dtype=torch.float64))
    theta = torch.log(torch.tensor([[0.8, 0.8, 0.2, 0.2]], dtype=torch.float64))
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones_like(old)
    keep = dc.dppo_valid_mask(theta, old, adv, mask, divergence="tv", delta_low=0.2, delta_high=0.2)
    # p rose by 0.3: masked for A>0 (pushing further up), kept for A<0; mirror for p fell by 0.3
    assert keep.tolist() == [[False, True, True, False]]
    keep_kl = dc.dppo_valid_mask(theta, old, adv, mask, divergence="kl", delta_low=0.05, delta_high=0.05)
    assert keep_kl.tolist() == [[False, True, True, False]]


def test_dppo_preset_defaults_and_fully_masked_batch():
    theta, old, _, _, adv, mask = make_batch(0, empty=True)
    th = theta.clone().requires_grad_()
    loss, metrics = get_preset("dppo")(LossInputs(logp_theta_BT=th, logp_old_BT=old, advantages_BT=adv, mask_BT=mask))
    (g,) = torch.autograd.grad(loss, th)
    assert float(loss.detach()) == 0.0 and torch.equal(g, torch.zeros_like(g))
    assert all(torch.isfinite(v) for v in metrics.values())
    p = get_preset("dppo")
    assert p.defaults["delta_low"] == 0.15 and p.defaults["agg"] == "seq-mean-token-sum-norm"


@pytest.mark.parametrize("name", ["decoupled_ppo", "ppo_ewma"])
def test_fully_masked_batch_zero(name):
    theta, old, prox, mu, adv, mask = make_batch(1, empty=True)
    th = theta.clone().requires_grad_()
    inp = LossInputs(logp_theta_BT=th, logp_old_BT=old, advantages_BT=adv, mask_BT=mask,
                     logp_mu_BT=mu, logp_prox_BT=prox)
    loss, metrics = get_preset(name)(inp)
    (g,) = torch.autograd.grad(loss, th)
    assert float(loss.detach()) == 0.0 and torch.equal(g, torch.zeros_like(g))
    assert all(torch.isfinite(v) for v in metrics.values())
