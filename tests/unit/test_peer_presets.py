"""The presets ported from the peers' code (issue 17 item 1): sapo, vespo, geo_mean, luspo, clip_cov, kl_cov, each vs
a loop written from its equation (verl core_algos.py / TRL grpo_trainer.py), gradient checks, and the whole-step
statistics of clip_cov / kl_cov under a micro-batch split."""

import math

import pytest
import torch

from tests.unit.test_core_objectives import make_batch
from tether.objectives import LossInputs, get_preset

pytestmark = pytest.mark.unit
DT = torch.float64
NEW = ["sapo", "vespo", "geo_mean", "luspo", "clip_cov", "kl_cov"]


def batch(seed=0, scale=0.3):
    logp_theta, logp_old, adv, mask = make_batch(B=6, T=7, seed=seed)
    logp_theta = (logp_old + scale / 0.3 * (logp_theta.detach() - logp_old)).requires_grad_(True)
    adv = adv[:, :1].expand_as(adv).clone()  # sequence advantages broadcast over tokens, as the loop gives them
    return logp_theta, logp_old, adv, mask


def rows(mask, i):
    return [t for t in range(mask.shape[1]) if mask[i, t]]


def f(x):
    return x.item() if isinstance(x, torch.Tensor) else x


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def loop_sapo(lt, lo, adv, mask, tau_pos=1.0, tau_neg=1.05):
    means = []
    for i in range(mask.shape[0]):
        ls = []
        for t in rows(mask, i):
            r, a = math.exp(f(lt[i, t]) - f(lo[i, t])), f(adv[i, t])
            tau = tau_pos if a > 0 else tau_neg
            ls.append(-sigmoid(tau * (r - 1)) * 4 / tau * a)
        if ls:
            means.append(sum(ls) / len(ls))
    return sum(means) / len(means)


def loop_vespo(lt, lo, adv, mask, k_pos=2.0, lam_pos=3.0, k_neg=3.0, lam_neg=2.0):
    total, n = 0.0, 0
    for i in range(mask.shape[0]):
        log_w = min(max(sum(f(lt[i, t]) - f(lo[i, t]) for t in rows(mask, i)), math.log(1e-8)), 20.0)
        for t in rows(mask, i):
            a = f(adv[i, t])
            k, lam = (k_pos, lam_pos) if a >= 0 else (k_neg, lam_neg)
            phi = math.exp(lam + k * log_w - lam * math.exp(log_w))
            total += -phi * a * f(lt[i, t])
            n += 1
    return total / n


def loop_geo_mean(lt, lo, adv, mask, eps_low=0.4, eps_high=0.4):
    losses = []
    for i in range(mask.shape[0]):
        toks = rows(mask, i)
        if not toks:
            continue
        zs = []
        for t in toks:
            z, a = f(lt[i, t]) - f(lo[i, t]), f(adv[i, t])
            zc = min(max(z, -eps_low), eps_high)
            zs.append(min(z, zc) if a > 0 else max(z, zc) if a < 0 else 0.0)
        s = math.exp(sum(zs) / len(zs))
        losses.append(-sum(f(adv[i, t]) for t in toks) / len(toks) * s)
    return sum(losses) / len(losses)


def loop_luspo(lt, lo, adv, mask, eps_low=2e-3, eps_high=2.5e-3):
    total, n_seq = 0.0, 0
    for i in range(mask.shape[0]):
        toks = rows(mask, i)
        if not toks:
            continue
        s = math.exp(sum(f(lt[i, t]) - f(lo[i, t]) for t in toks) / len(toks))
        a = f(adv[i, toks[0]])
        seq_loss = -min(s * a, min(max(s, 1 - eps_low), 1 + eps_high) * a)
        total += len(toks) * seq_loss
        n_seq += 1
    return total / n_seq


def loop_cov_selection(lt, lo, adv, mask, ratio, band=None, eps=0.2):
    """The selected (i, t): the max(floor(ratio N), 1) largest covariances among the candidates."""
    toks = [(i, t) for i in range(mask.shape[0]) for t in rows(mask, i)]
    ma = sum(f(adv[i, t]) for i, t in toks) / len(toks)
    ml = sum(f(lt[i, t]) for i, t in toks) / len(toks)
    cands = []
    for i, t in toks:
        cov = (f(adv[i, t]) - ma) * (f(lt[i, t]) - ml)
        if band is not None:
            r, a = math.exp(f(lt[i, t]) - f(lo[i, t])), f(adv[i, t])
            if -a * min(max(r, 1 - eps), 1 + eps) > -a * r or not band[0] < cov < band[1]:
                continue
        cands.append((cov, i, t))
    n = max(int(ratio * len(toks)), 1)
    return {(i, t) for _, i, t in sorted(cands, reverse=True)[:n]}


def loop_clip_cov(lt, lo, adv, mask, ratio, lb, ub, eps=0.2):
    sel = loop_cov_selection(lt, lo, adv, mask, ratio, band=(lb, ub), eps=eps)
    total, n = 0.0, 0
    for i in range(mask.shape[0]):
        for t in rows(mask, i):
            r, a = math.exp(f(lt[i, t]) - f(lo[i, t])), f(adv[i, t])
            if (i, t) not in sel:
                total += max(-a * r, -a * min(max(r, 1 - eps), 1 + eps))
            n += 1
    return total / n, len(sel)


def loop_kl_cov(lt, lo, adv, mask, ratio, coef):
    sel = loop_cov_selection(lt, lo, adv, mask, ratio)
    total, n = 0.0, 0
    for i in range(mask.shape[0]):
        for t in rows(mask, i):
            z, a = f(lt[i, t]) - f(lo[i, t]), f(adv[i, t])
            total += -a * math.exp(z) + (coef * abs(z) if (i, t) in sel else 0.0)
            n += 1
    return total / n, len(sel)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name,loop,args", [
    ("sapo", loop_sapo, {}), ("sapo", lambda *a: loop_sapo(*a, tau_pos=2.0, tau_neg=0.5), {"tau_pos": 2.0, "tau_neg": 0.5}),
    ("vespo", loop_vespo, {}), ("geo_mean", loop_geo_mean, {}),
    ("geo_mean", lambda *a: loop_geo_mean(*a, eps_low=0.05, eps_high=0.1), {"eps_low": 0.05, "eps_high": 0.1}),
    ("luspo", loop_luspo, {}), ("luspo", lambda *a: loop_luspo(*a, eps_low=0.1, eps_high=0.2),
                                {"eps_low": 0.1, "eps_high": 0.2}),
])
def test_preset_matches_loop(name, loop, args, seed):
    lt, lo, adv, mask = batch(seed)
    loss, metrics = get_preset(name)(LossInputs(lt, lo, adv, mask), **args)
    assert loss.item() == pytest.approx(loop(lt, lo, adv, mask), rel=1e-10, abs=1e-12)
    assert all(not v.requires_grad for v in metrics.values())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ratio,lb,ub", [(0.2, 0.05, 5.0), (2e-4, 0.05, 5.0), (0.5, -1.0, 0.3)])
def test_clip_cov_matches_loop(seed, ratio, lb, ub):
    lt, lo, adv, mask = batch(seed)
    loss, metrics = get_preset("clip_cov")(LossInputs(lt, lo, adv, mask), ratio=ratio, lb=lb, ub=ub)
    want, n_sel = loop_clip_cov(lt, lo, adv, mask, ratio, lb, ub)
    assert n_sel > 0  # the case selects tokens
    assert loss.item() == pytest.approx(want, rel=1e-10, abs=1e-12)
    assert metrics["clip_cov/selected_frac"].item() == pytest.approx(n_sel / mask.sum().item())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ratio,coef", [(0.2, 0.1), (2e-4, 0.1), (0.5, 1.0)])
def test_kl_cov_matches_loop(seed, ratio, coef):
    lt, lo, adv, mask = batch(seed)
    loss, metrics = get_preset("kl_cov")(LossInputs(lt, lo, adv, mask), ratio=ratio, kl_coef=coef)
    want, n_sel = loop_kl_cov(lt, lo, adv, mask, ratio, coef)
    assert loss.item() == pytest.approx(want, rel=1e-10, abs=1e-12)
    assert metrics["kl_cov/selected_frac"].item() == pytest.approx(n_sel / mask.sum().item())


@pytest.mark.parametrize("name,args", [("sapo", {}), ("geo_mean", {}), ("luspo", {"eps_low": 0.1, "eps_high": 0.1}),
                                       ("clip_cov", {"ratio": 0.2, "lb": 0.05}), ("kl_cov", {"ratio": 0.2})])
def test_gradcheck(name, args):
    """Presets without a stop-gradient: autograd equals finite differences (selections fixed: small steps)."""
    lt, lo, adv, mask = batch(seed=3, scale=0.05)

    def loss(x):
        return get_preset(name)(LossInputs(x, lo, adv, mask), **args)[0]

    assert torch.autograd.gradcheck(loss, (lt,))


def test_sapo_gradient_is_the_policy_gradient_at_ratio_one_and_decays_away_from_it():
    lt, lo, adv, mask = batch(seed=4)
    at_one = lo.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(get_preset("sapo")(LossInputs(at_one, lo, adv, mask), agg="token-mean")[0], at_one)
    torch.testing.assert_close(g, -adv * mask / mask.sum(), rtol=1e-12, atol=1e-14)
    (g,) = torch.autograd.grad(get_preset("sapo")(LossInputs(lt, lo, adv, mask), agg="token-mean")[0], lt)
    r = torch.exp(lt.detach() - lo)
    s = torch.sigmoid(torch.where(adv > 0, torch.tensor(1.0, dtype=DT), torch.tensor(1.05, dtype=DT)) * (r - 1))
    torch.testing.assert_close(g, -adv * 4 * s * (1 - s) * r * mask / mask.sum(), rtol=1e-10, atol=1e-14)


def test_vespo_weight_is_detached_and_one_at_ratio_one():
    """d loss / d log pi_t = -phi(w_i) A / N (phi carries no gradient) and phi(1) = 1: at pi_theta = pi_old VESPO is
    REINFORCE."""
    lt, lo, adv, mask = batch(seed=5)
    loss, m = get_preset("vespo")(LossInputs(lt, lo, adv, mask))
    (g,) = torch.autograd.grad(loss, lt)
    seq = ((lt.detach() - lo) * mask).sum(-1, keepdim=True).clamp(math.log(1e-8), 20.0)
    k = torch.where(adv >= 0, 2.0, 3.0)
    lam = torch.where(adv >= 0, 3.0, 2.0)
    phi = torch.exp(lam + k * seq - lam * torch.exp(seq))
    torch.testing.assert_close(g, -phi * adv * mask / mask.sum(), rtol=1e-10, atol=1e-14)
    at_one = lo.clone().requires_grad_(True)
    loss, m = get_preset("vespo")(LossInputs(at_one, lo, adv, mask))
    assert m["vespo/phi_mean"].item() == pytest.approx(1.0, rel=1e-12)
    (g,) = torch.autograd.grad(loss, at_one)
    torch.testing.assert_close(g, -adv * mask / mask.sum(), rtol=1e-12, atol=1e-14)


def test_luspo_scales_each_sequence_by_its_length():
    """LUSPO's gradient on a row is |y_i| times GSPO-style sequence-mean's: per token d/d log pi_t = -A s_i / N_seq
    where unclipped."""
    lt, lo, adv, mask = batch(seed=6, scale=0.001)
    loss, _ = get_preset("luspo")(LossInputs(lt, lo, adv, mask), eps_low=1.0, eps_high=1.0)
    (g,) = torch.autograd.grad(loss, lt)
    m = mask.to(DT)
    s = torch.exp(((lt.detach() - lo) * m).sum(-1) / m.sum(-1).clamp(min=1))[:, None]
    n_seq = (m.sum(-1) > 0).sum()
    torch.testing.assert_close(g, -adv * s * m / n_seq, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name,args", [("clip_cov", {"ratio": 0.2, "lb": 0.05}), ("kl_cov", {"ratio": 0.2})])
def test_covariance_presets_are_exact_under_a_split(name, args):
    """A micro-batch given the whole step's statistics (Preset.batch_stats) computes its exact share of the whole
    step's loss and gradient; computing them per micro-batch instead (the control) does not."""
    lt, lo, adv, mask = batch(seed=8)
    preset = get_preset(name)
    whole_args = preset.step_overrides(LossInputs(lt, lo, adv, mask), preset.resolve(args))
    whole, _ = preset(LossInputs(lt, lo, adv, mask), **args)
    (g_whole,) = torch.autograd.grad(whole, lt)
    n_tok = mask.sum().item()

    def split(step_args):
        total = 0.0
        for rows_ in (slice(0, 3), slice(3, 6)):
            inp = LossInputs(lt[rows_], lo[rows_], adv[rows_], mask[rows_], num_tokens=n_tok)
            total = total + preset(inp, **step_args)[0]
        return total

    got = split(whole_args)
    (g_split,) = torch.autograd.grad(got, lt)
    torch.testing.assert_close(got, whole, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_split, g_whole, rtol=1e-12, atol=1e-14)
    assert abs(split(preset.resolve(args)).item() - whole.item()) > 1e-6
