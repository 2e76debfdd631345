"""Rollout corrections pi_old vs mu against slow loop references (float64)."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from tether.objectives import LossInputs, aggregate, get_preset
from tether.objectives import rollout_correction as rc
from tether.objectives.decoupled import roll_infer_correction
from tether.objectives.policy_gradient import ppo_clip_loss
from tether.objectives.ratios import token_log_ratio

pytestmark = pytest.mark.unit

RTOL = 1e-9
ATOL = 1e-12
CLAMP = 20.0

MASK_ROWS = [
    [0, 0, 0, 0, 0, 0, 0],  # empty row
    [1, 0, 0, 0, 0, 0, 0],  # length-1 sequence
    [1, 1, 1, 1, 1, 1, 1],
    [1, 1, 1, 1, 0, 0, 0],  # right padding
    [1, 1, 0, 0, 1, 1, 0],  # tool-output holes
    [0, 1, 1, 0, 1, 1, 1],
]


def make_batch(seed: int, *, extreme: bool = True, spread: float = 0.6, full_mask_off: bool = False):
    g = torch.Generator().manual_seed(seed)
    B, T = len(MASK_ROWS), len(MASK_ROWS[0])
    mask = torch.tensor(MASK_ROWS, dtype=torch.float64)
    if full_mask_off:
        mask = torch.zeros_like(mask)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3.0 - 0.05
    theta = (old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).clamp(max=-1e-3)
    mu = old + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    adv[3] = -abs(adv[3, 0])  # one row with a broadcast negative advantage
    adv[2] = abs(adv[2, 0])
    if extreme:
        mu[2, 3] = old[2, 3] - 50.0  # ratio e^50
        mu[4, 0] = old[4, 0] + 50.0  # ratio e^-50
        mu[5, 6] = old[5, 6] - 50.0
    # garbage on padding must be ignored
    pad = mask == 0
    mu = torch.where(pad, torch.full_like(mu, 1e4), mu)
    old = torch.where(pad, torch.full_like(old, -1e4), old)
    return theta, old, mu, adv, mask


def inputs_of(theta, old, mu, adv, mask, **kw) -> LossInputs:
    return LossInputs(
        logp_theta_BT=theta, logp_old_BT=old, advantages_BT=adv, mask_BT=mask, logp_mu_BT=mu, **kw
    )


# ------------------------------------------------------------------------------------------------
# loop references


def ref_delta(old, mu, mask):
    B, T = mask.shape
    out = [[0.0] * T for _ in range(B)]
    for i in range(B):
        for t in range(T):
            if mask[i, t]:
                out[i][t] = max(-CLAMP, min(CLAMP, float(old[i, t]) - float(mu[i, t])))
    return out


def rows(mask):
    return [[t for t in range(mask.shape[1]) if mask[i, t]] for i in range(mask.shape[0])]


def ref_level_log(d, mask, level):
    """Per-token log weight at a level (0 on padding)."""
    B, T = mask.shape
    out = [[0.0] * T for _ in range(B)]
    for i, ts in enumerate(rows(mask)):
        s = sum(d[i][t] for t in ts)
        for t in ts:
            if level == "token":
                out[i][t] = d[i][t]
            elif level == "sequence":
                out[i][t] = max(-CLAMP, min(CLAMP, s))
            else:
                out[i][t] = s / len(ts)
    return out


def log_or_inf(x):
    return -math.inf if x == 0 else math.log(x)


def ref_tis(old, mu, mask, level, cap, floor):
    d = ref_delta(old, mu, mask)
    lw = ref_level_log(d, mask, level)
    B, T = mask.shape
    w = torch.zeros(B, T, dtype=torch.float64)
    hi = lo = 0
    n = 0
    for i, ts in enumerate(rows(mask)):
        for t in ts:
            n += 1
            hi += lw[i][t] > log_or_inf(cap)
            lo += lw[i][t] < log_or_inf(floor)
            w[i, t] = min(cap, max(floor, math.exp(lw[i][t])))
    return w, hi / max(n, 1), lo / max(n, 1)


def ref_stats(w, mask):
    vals = [float(w[i, t]) for i, ts in enumerate(rows(mask)) for t in ts]
    if not vals:
        return 0.0, 0.0, 0.0
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
    return mean, std, max(vals)


def ref_ppo(theta, old, adv, mask, eps_low=0.2, eps_high=0.2, c=3.0):
    B, T = mask.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for i, ts in enumerate(rows(mask)):
        for t in ts:
            r = math.exp(max(-CLAMP, min(CLAMP, float(theta[i, t]) - float(old[i, t]))))
            A = float(adv[i, t])
            l = max(-A * r, -A * min(max(r, 1 - eps_low), 1 + eps_high))
            if c is not None and A < 0:
                l = min(l, -A * c)
            out[i, t] = l
    return out


def ref_token_mean(loss, mask):
    n = sum(len(ts) for ts in rows(mask))
    return sum(float(loss[i, t]) for i, ts in enumerate(rows(mask)) for t in ts) / max(n, 1)


def close(a, b, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               rtol=rtol, atol=atol)


SEEDS = [0, 1, 2]


# ------------------------------------------------------------------------------------------------
# weights


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
@pytest.mark.parametrize(("cap", "floor"), [(2.0, 0.0), (5.0, 0.5), (math.inf, 0.0)])
def test_truncated_is_weights_match_loop(seed, level, cap, floor):
    _, old, mu, _, mask = make_batch(seed)
    w, m = rc.truncated_is_weights(old, mu, mask, level=level, cap=cap, floor=floor)
    w_ref, hi, lo = ref_tis(old, mu, mask, level, cap, floor)
    close(w, w_ref)
    mean, std, wmax = ref_stats(w_ref, mask)
    close(m["tis/weight_mean"], mean)
    close(m["tis/weight_std"], std)
    close(m["tis/weight_max"], wmax)
    close(m["tis/clipfrac_high"], hi)
    close(m["tis/clipfrac_low"], lo)
    assert not w.requires_grad


def test_truncated_is_weights_detached_even_if_inputs_carry_grad():
    _, old, mu, _, mask = make_batch(0)
    old = old.clone().requires_grad_()
    w, _ = rc.truncated_is_weights(old, mu, mask)
    assert not w.requires_grad


def test_mismatch_metrics_loop():
    _, old, mu, _, mask = make_batch(1)
    _, m = rc.truncated_is_weights(old, mu, mask)
    d = ref_delta(old, mu, mask)
    vals = [d[i][t] for i, ts in enumerate(rows(mask)) for t in ts]
    close(m["mismatch/kl_k1"], sum(-v for v in vals) / len(vals))
    close(m["mismatch/kl_k3"], sum(math.exp(v) - 1 - v for v in vals) / len(vals))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_self_normalised_weights_match_loop(seed, level):
    _, old, mu, _, mask = make_batch(seed, extreme=False)
    w, _ = rc.truncated_is_weights(old, mu, mask, level=level, cap=3.0)
    wn, mean = rc.self_normalised_weights(w, mask, level=level)
    if level == "token":
        vals = [float(w[i, t]) for i, ts in enumerate(rows(mask)) for t in ts]
    else:
        vals = [float(w[i, ts[0]]) for i, ts in enumerate(rows(mask)) if ts]
    ref_mean = sum(vals) / len(vals)
    close(mean, ref_mean)
    for i, ts in enumerate(rows(mask)):
        for t in ts:
            close(wn[i, t], float(w[i, t]) / ref_mean)
    # the normalised weights have mean 1 at their level
    if level == "token":
        close(rc.weight_metrics(wn, mask, "x")["x/weight_mean"], 1.0)


def test_self_normalised_weights_all_zero_or_empty_are_unchanged():
    _, old, mu, _, mask = make_batch(0, full_mask_off=True)
    w, _ = rc.truncated_is_weights(old, mu, mask)
    wn, mean = rc.self_normalised_weights(w, mask)
    assert float(mean) == 0.0
    assert torch.equal(wn, w)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("low", "high"), [(0.5, 5.0), (0.8, 1.25), (0.0, math.inf)])
def test_icepop_mask_and_weights_match_loop(seed, low, high):
    _, old, mu, _, mask = make_batch(seed)
    keep = rc.icepop_mask(old, mu, mask, low=low, high=high)
    w, m = rc.icepop_weights(old, mu, mask, low=low, high=high)
    d = ref_delta(old, mu, mask)
    B, T = mask.shape
    n = n_lo = n_hi = 0
    for i in range(B):
        for t in range(T):
            if not mask[i, t]:
                assert not keep[i, t] and w[i, t] == 0
                continue
            n += 1
            inside = log_or_inf(low) <= d[i][t] <= log_or_inf(high)
            n_lo += d[i][t] < log_or_inf(low)
            n_hi += d[i][t] > log_or_inf(high)
            assert bool(keep[i, t]) == inside
            close(w[i, t], math.exp(d[i][t]) if inside else 0.0)
    close(m["icepop/maskfrac_low"], n_lo / n)
    close(m["icepop/maskfrac_high"], n_hi / n)


def test_icepop_extreme_ratios_are_masked():
    _, old, mu, _, mask = make_batch(0)
    keep = rc.icepop_mask(old, mu, mask)
    assert not keep[2, 3] and not keep[4, 0] and not keep[5, 6]


# ------------------------------------------------------------------------------------------------
# masks


def ref_seq_keep(old, mu, mask, low, high, geometric):
    d = ref_delta(old, mu, mask)
    keep = []
    for i, ts in enumerate(rows(mask)):
        s = sum(d[i][t] for t in ts)
        if geometric and ts:
            s /= len(ts)
        keep.append(log_or_inf(low) <= s <= log_or_inf(high))
    return keep


def assert_row_keep(keep_BT, keep_rows, mask):
    for i, ts in enumerate(rows(mask)):
        for t in range(mask.shape[1]):
            expected = keep_rows[i] and t in ts
            assert bool(keep_BT[i, t]) == expected, (i, t)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("geometric", [False, True])
@pytest.mark.parametrize(("low", "high"), [(0.5, 2.0), (0.1, 10.0), (0.999, 1.001)])
def test_sequence_ratio_mask_matches_loop(seed, geometric, low, high):
    _, old, mu, _, mask = make_batch(seed)
    keep = rc.sequence_ratio_mask(old, mu, mask, low=low, high=high, geometric=geometric)
    assert_row_keep(keep, ref_seq_keep(old, mu, mask, low, high, geometric), mask)


def ref_divergence_keep(old, mu, mask, est, agg, high, low):
    d = ref_delta(old, mu, mask)
    B, T = mask.shape
    keep = [[False] * T for _ in range(B)]

    def f(x):
        return {"k1": x, "k2": 0.5 * x * x, "k3": math.exp(x) - 1 - x}[est]

    def ok(stat):
        if est == "k1":
            lo = 1.0 / high if low is None else low
            return math.log(lo) <= stat <= math.log(high)
        return stat <= high

    for i, ts in enumerate(rows(mask)):
        vals = [f(d[i][t]) for t in ts]
        if agg == "token":
            for t, v in zip(ts, vals):
                keep[i][t] = ok(v)
            continue
        if agg == "seq-sum":
            stat = sum(vals)
        elif agg == "seq-mean":
            stat = sum(vals) / len(vals) if vals else 0.0
        else:
            stat = max(vals) if vals else 0.0
        for t in ts:
            keep[i][t] = ok(stat)
    return keep


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    ("est", "agg", "high", "low"),
    [
        ("k1", "token", 1.5, 0.5),
        ("k1", "token", 2.0, None),
        ("k1", "seq-sum", 2.0, 0.4),
        ("k1", "seq-mean", 1.3, None),
        ("k2", "token", 0.1, None),
        ("k2", "seq-sum", 0.5, None),
        ("k2", "seq-mean", 0.1, None),
        ("k2", "seq-max", 0.2, None),
        ("k3", "token", 0.1, None),
        ("k3", "seq-sum", 0.5, None),
        ("k3", "seq-mean", 0.1, None),
        ("k3", "seq-max", 0.2, None),
    ],
)
def test_divergence_rejection_matches_loop(seed, est, agg, high, low):
    _, old, mu, _, mask = make_batch(seed)
    keep = rc.divergence_rejection_mask(old, mu, mask, estimator=est, agg=agg, high=high, low=low)
    ref = ref_divergence_keep(old, mu, mask, est, agg, high, low)
    assert keep.tolist() == ref


def _verl_token_k1_keep(old, mu, mask, spec: str):
    """verl ``rollout_rs="token_k1"`` restated: ``token_k1 = -clamp(log pi_old - log mu, +-20)``, kept iff
    ``log lower <= token_k1 <= log upper`` with ``spec = "lower_upper"``."""
    lower, upper = (float(x) for x in spec.split("_"))
    k1 = -(old - mu).clamp(-CLAMP, CLAMP)
    return (k1 >= math.log(lower)) & (k1 <= math.log(upper)) & mask.bool()


def test_verl_token_k1_band_is_the_mirror():
    """verl's k1 tests log(mu/pi_old): its "0.5_5.0" is tether's [0.2, 2], not IcePop's [0.5, 5];
    reciprocal bands (low = 1/high) are the same in both."""
    _, old, mu, _, mask = make_batch(1, spread=1.0)
    verl = _verl_token_k1_keep(old, mu, mask, "0.5_5.0")
    tether = partial(rc.divergence_rejection_mask, old, mu, mask, estimator="k1", agg="token")
    assert torch.equal(tether(low=0.2, high=2.0), verl)
    assert not torch.equal(tether(low=0.5, high=5.0), verl)
    assert torch.equal(rc.icepop_mask(old, mu, mask, low=0.2, high=2.0), verl)
    assert torch.equal(tether(low=0.5, high=2.0), _verl_token_k1_keep(old, mu, mask, "0.5_2.0"))


def test_divergence_rejection_rejects_bad_options():
    _, old, mu, _, mask = make_batch(0)
    with pytest.raises(ValueError, match="seq-max"):
        rc.divergence_rejection_mask(old, mu, mask, estimator="k1", agg="seq-max", high=2.0)
    with pytest.raises(ValueError, match="divergence estimator 'k4'"):
        rc.divergence_rejection_mask(old, mu, mask, estimator="k4", agg="token", high=2.0)
    with pytest.raises(ValueError, match="divergence aggregation"):
        rc.divergence_rejection_mask(old, mu, mask, estimator="k2", agg="seq-median", high=2.0)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("threshold", [1e-4, 0.3, 0.9, 1.0, 1.5, 20.0])
def test_catastrophic_veto_matches_loop(seed, threshold):
    """Thresholds > 1 take the masked branch of the veto (padding's delta = 0 is below log threshold
    there); test_veto_above_one_judges_loss_tokens_only pins what that branch must get right."""
    _, old, mu, _, mask = make_batch(seed)
    keep = rc.catastrophic_veto_mask(old, mu, mask, threshold=threshold)
    d = ref_delta(old, mu, mask)
    keep_rows = [all(math.exp(d[i][t]) >= threshold for t in ts) for i, ts in enumerate(rows(mask))]
    assert_row_keep(keep, keep_rows, mask)


def test_veto_above_one_judges_loss_tokens_only():
    """Hand-made, threshold 2: ratios (3, 4) + padding kept; (3, 1.5) vetoed; an empty row kept."""
    mu = torch.zeros(3, 3, dtype=torch.float64)
    old = torch.log(torch.tensor([[3.0, 4.0, 1.0], [3.0, 1.5, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float64))
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.float64)
    keep = rc.catastrophic_veto_mask(old, mu, mask, threshold=2.0)
    assert keep.tolist() == [[True, True, False], [False, False, False], [False, False, False]]
    _, m = rc.masked_is_weights(old, mu, mask, level="token", low=0.0, high=math.inf, veto=2.0)
    close(m["mis/maskfrac_veto"], 2 / 4)  # row 1's two tokens of the four loss tokens


@pytest.mark.parametrize("threshold", [1e-4, 1.0, 2.0])
def test_veto_with_no_token_positions(threshold):
    """T = 0 (no position at all) takes the masked branch too: everything is kept, metrics are 0."""
    empty = torch.zeros(3, 0, dtype=torch.float64)
    keep = rc.catastrophic_veto_mask(empty, empty, empty, threshold=threshold)
    assert keep.shape == (3, 0) and keep.dtype == torch.bool
    for level in ("token", "sequence", "geometric"):
        w, m = rc.masked_is_weights(empty, empty, empty, level=level, veto=threshold)
        assert w.shape == (3, 0)
        assert all(float(v) == 0.0 for v in m.values()), m
    w, _, m = roll_infer_correction(empty, empty, empty, catastrophic=threshold)
    assert w.shape == (3, 0) and all(float(v) == 0.0 for v in m.values()), m
    loss, m = get_preset("mis")(inputs_of(empty, empty, empty, empty, empty), veto=threshold)
    assert float(loss) == 0.0 and all(torch.isfinite(v) for v in m.values())


def test_catastrophic_veto_drops_e_minus_50_row():
    _, old, mu, _, mask = make_batch(0)
    keep = rc.catastrophic_veto_mask(old, mu, mask)
    assert not keep[4].any()  # the row with ratio e^-50
    assert keep[2].all()  # e^+50 is not catastrophic


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("delta", [1e-4, 0.05, 0.3])
def test_opsm_matches_loop(seed, delta):
    theta, _, mu, adv, mask = make_batch(seed, extreme=False)
    keep = rc.opsm_mask(theta, mu, adv, mask, delta=delta)
    B, T = mask.shape
    for i, ts in enumerate(rows(mask)):
        kl = sum(float(mu[i, t]) - float(theta[i, t]) for t in ts) / max(len(ts), 1)
        for t in range(T):
            expected = t in ts and not (float(adv[i, t]) < 0 and kl > delta)
            assert bool(keep[i, t]) == expected


def test_opsm_keeps_positive_advantages_whatever_the_kl():
    theta, _, mu, adv, mask = make_batch(0)
    mu = theta - 30.0  # mu << theta: kl very negative
    keep = rc.opsm_mask(theta, mu + 60.0, adv.abs(), mask, delta=0.0)
    assert torch.equal(keep, mask.bool())


# ------------------------------------------------------------------------------------------------
# masked IS


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("veto", [1e-4, 0.5, None])
def test_masked_is_weights_match_loop(seed, level, weighted, veto):
    _, old, mu, _, mask = make_batch(seed)
    low, high = 0.3, 3.0
    w, m = rc.masked_is_weights(old, mu, mask, level=level, low=low, high=high, weighted=weighted, veto=veto)
    d = ref_delta(old, mu, mask)
    lw = ref_level_log(d, mask, level)
    B, T = mask.shape
    n = n_band = n_veto = n_any = 0
    for i, ts in enumerate(rows(mask)):
        s = sum(d[i][t] for t in ts)
        if level == "geometric" and ts:
            s /= len(ts)
        vetoed = veto is not None and any(math.exp(d[i][t]) < veto for t in ts)
        for t in range(T):
            if t not in ts:
                assert w[i, t] == 0
                continue
            n += 1
            x = d[i][t] if level == "token" else s
            in_band = math.log(low) <= x <= math.log(high)
            n_band += not in_band
            n_veto += vetoed
            kept = in_band and not vetoed
            n_any += not kept
            expected = (math.exp(lw[i][t]) if weighted else 1.0) if kept else 0.0
            close(w[i, t], expected)
    close(m["mis/maskfrac_band"], n_band / n)
    close(m["mis/maskfrac_veto"], n_veto / n)
    close(m["mis/maskfrac"], n_any / n)


# ------------------------------------------------------------------------------------------------
# presets: value, gradient, identity, errors


def preset_loss_and_grad(name, theta, old, mu, adv, mask, **hp):
    th = theta.clone().requires_grad_()
    loss, metrics = get_preset(name)(inputs_of(th, old, mu, adv, mask), **hp)
    (g,) = torch.autograd.grad(loss, th, allow_unused=False)
    return loss.detach(), g, metrics


def ppo_token_grad(theta, old, adv, mask, **hp):
    """Gradient of the token-mean PPO loss, per token (what the weights must rescale)."""
    th = theta.clone().requires_grad_()
    lr = token_log_ratio(th, old, mask)
    loss_BT, _ = ppo_clip_loss(lr, adv, mask, **hp)
    (g,) = torch.autograd.grad(aggregate(loss_BT, mask, "token-mean"), th)
    return g


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    ("name", "hp", "weights"),
    [
        ("tis", {}, lambda o, m, k: rc.truncated_is_weights(o, m, k, cap=2.0)[0]),
        ("tis", {"level": "sequence", "cap": 3.0}, lambda o, m, k: ref_tis(o, m, k, "sequence", 3.0, 0.0)[0]),
        ("icepop", {}, lambda o, m, k: rc.icepop_weights(o, m, k, low=0.5, high=5.0)[0]),
        ("mis", {}, lambda o, m, k: rc.masked_is_weights(o, m, k, level="sequence", low=0.5, high=2.0)[0]),
        ("mis", {"level": "token", "low": 0.7, "high": 1.4, "veto": None}, None),
    ],
)
def test_preset_value_and_gradient(seed, name, hp, weights):
    theta, old, mu, adv, mask = make_batch(seed, spread=0.3)
    loss, g, metrics = preset_loss_and_grad(name, theta, old, mu, adv, mask, **hp)
    if name == "tis":
        w_ref, _, _ = ref_tis(old, mu, mask, hp.get("level", "token"), hp.get("cap", 2.0), 0.0)
    elif name == "icepop":
        d = ref_delta(old, mu, mask)
        w_ref = torch.tensor([[math.exp(x) if (mask[i, t] and math.log(0.5) <= x <= math.log(5.0)) else 0.0
                               for t, x in enumerate(row)] for i, row in enumerate(d)], dtype=torch.float64)
    else:
        d = ref_delta(old, mu, mask)
        level = hp.get("level", "sequence")
        lo, hi = hp.get("low", 0.5), hp.get("high", 2.0)
        veto = hp.get("veto", 1e-4)
        w_ref = torch.zeros_like(mask)
        for i, ts in enumerate(rows(mask)):
            s = sum(d[i][t] for t in ts)
            bad = veto is not None and any(math.exp(d[i][t]) < veto for t in ts)
            for t in ts:
                x = d[i][t] if level == "token" else s
                if math.log(lo) <= x <= math.log(hi) and not bad:
                    w_ref[i, t] = math.exp(d[i][t] if level == "token" else max(-CLAMP, min(CLAMP, s)))
    if weights is not None:
        close(weights(old, mu, mask), w_ref)
    ppo = ref_ppo(theta, old, adv, mask)
    close(loss, ref_token_mean(w_ref * ppo, mask))
    # gradient: w_t times the PPO gradient (weights are detached)
    close(g, w_ref * ppo_token_grad(theta, old, adv, mask, eps_low=0.2, eps_high=0.2, dual_clip_c=3.0))
    for k, v in metrics.items():
        assert v.dim() == 0 and not v.requires_grad and torch.isfinite(v), k


def test_tis_with_infinite_cap_is_plain_is_weighted_ppo():
    theta, old, mu, adv, mask = make_batch(3, extreme=False, spread=0.5)
    loss, g, _ = preset_loss_and_grad("tis", theta, old, mu, adv, mask, cap=math.inf)
    # plain IS, written independently: w = pi_old / mu, no truncation
    w = torch.where(mask.bool(), torch.exp(old - mu), torch.zeros_like(old))
    th = theta.clone().requires_grad_()
    r = torch.exp(torch.where(mask.bool(), th - old, torch.zeros_like(th)))
    l = torch.maximum(-adv * r, -adv * r.clamp(0.8, 1.2))
    l = torch.where(adv < 0, torch.minimum(l, -adv * 3.0), l)
    plain = (w * l * mask).sum() / mask.sum()
    (g_plain,) = torch.autograd.grad(plain, th)
    close(loss, plain.detach())
    close(g, g_plain)
    assert float(w.max()) > 2.0  # the cap would have mattered


@pytest.mark.parametrize("name", ["tis", "icepop", "mis"])
def test_fully_masked_batch_gives_zero_loss_and_gradient(name):
    theta, old, mu, adv, mask = make_batch(0, full_mask_off=True)
    loss, g, metrics = preset_loss_and_grad(name, theta, old, mu, adv, mask)
    assert float(loss) == 0.0
    assert torch.equal(g, torch.zeros_like(g))
    for k, v in metrics.items():
        assert torch.isfinite(v), k


@pytest.mark.parametrize("name", ["tis", "icepop", "mis"])
def test_missing_logp_mu_is_a_clear_error(name):
    theta, old, _, adv, mask = make_batch(0)
    inputs = LossInputs(logp_theta_BT=theta, logp_old_BT=old, advantages_BT=adv, mask_BT=mask)
    with pytest.raises(ValueError, match=rf"'{name}' needs LossInputs\.logp_mu_BT"):
        get_preset(name)(inputs)
    # calling the function directly (bypassing the preset) fails the same way
    with pytest.raises(ValueError, match="logp_mu_BT"):
        get_preset(name).fn(inputs, **get_preset(name).defaults)


def test_tis_self_normalise_has_mean_one_weights():
    theta, old, mu, adv, mask = make_batch(1, spread=0.3)
    loss, g, m = preset_loss_and_grad("tis", theta, old, mu, adv, mask, self_normalise=True)
    close(m["tis/normalised/weight_mean"], 1.0)
    w, _ = rc.truncated_is_weights(old, mu, mask)
    wn = w / m["tis/batch_norm_factor"]
    close(loss, ref_token_mean(wn * ref_ppo(theta, old, adv, mask), mask))


def test_bad_bounds_and_levels_are_errors():
    _, old, mu, _, mask = make_batch(0)
    with pytest.raises(ValueError, match="level 'seq'"):
        rc.truncated_is_weights(old, mu, mask, level="seq")
    with pytest.raises(ValueError, match="cap"):
        rc.truncated_is_weights(old, mu, mask, cap=0.5, floor=1.0)
    with pytest.raises(ValueError, match="high"):
        rc.icepop_mask(old, mu, mask, low=2.0, high=1.0)
    with pytest.raises(ValueError, match=">= 0"):
        rc.icepop_mask(old, mu, mask, low=-1.0, high=1.0)


def test_presets_are_registered_with_docs_fields():
    for name in ["tis", "icepop", "mis"]:
        p = get_preset(name)
        assert p.requires == ("logp_mu_BT",)
        assert p.description and p.equation and p.source
        assert "agg" in p.defaults
