"""Length-calibrated sequence thresholds (issue 17 item 3) against loop references written from the equations
(float64), the presets' losses and gradients, the start-up checks, and the property the sqrt rule is derived from."""

from __future__ import annotations

import math

import pytest
import torch

from tests.unit.test_rollout_correction import (
    CLAMP,
    close,
    inputs_of,
    make_batch,
    ppo_token_grad,
    preset_loss_and_grad,
    ref_delta,
    ref_ppo,
    ref_token_mean,
    rows,
)
from tether.objectives import get_preset
from tether.objectives import rollout_correction as rc
from tether.objectives.length_calibration import (
    bound_range_metrics,
    calibrated_log_bound,
    check_length_calibration,
    length_factor,
)

pytestmark = pytest.mark.unit
SEEDS = [0, 1, 2]
RULES = [("geo", 0.0), ("sqrt", 0.0), ("sqrt", -0.05)]


def ref_bound(log_b0: float, T: int, rule: str, T0: float, m: float = 0.0) -> float:
    """log B(T), written from the module docstring."""
    if math.isinf(log_b0) or rule == "none":
        return log_b0
    if rule == "geo":
        return T / T0 * log_b0
    return m * T + math.sqrt(T / T0) * (log_b0 - m * T0)


def log_or_inf(x: float) -> float:
    return -math.inf if x == 0 else math.log(x)


def seq_sum(d, ts):
    return sum(d[t] for t in ts)


# ------------------------------------------------------------------------------------------------
# the bound itself


@pytest.mark.parametrize("rule", ["none", "geo", "sqrt"])
@pytest.mark.parametrize("log_b0", [math.log(2.0), math.log(0.5), math.log(1.0), math.inf, -math.inf])
@pytest.mark.parametrize("drift", [0.0, -0.1])
def test_calibrated_log_bound_matches_loop(rule, log_b0, drift):
    if drift and rule != "sqrt":
        return
    lens = [0, 1, 2, 3, 4, 7, 16, 1000]
    got = calibrated_log_bound(log_b0, torch.tensor(lens), length_calibration=rule, ref_len=4.0, length_drift=drift)
    assert got.dtype == torch.float64 and got.shape == (len(lens),)
    for T, g in zip(lens, got.tolist()):
        want = ref_bound(log_b0, T, rule, 4.0, drift)
        if math.isinf(want):
            assert g == want
        else:
            assert g == pytest.approx(want, rel=1e-12, abs=1e-15)
    # at the reference length every rule gives the bound it was given
    at_ref = calibrated_log_bound(log_b0, torch.tensor([4]), length_calibration=rule, ref_len=4.0, length_drift=drift)
    assert float(at_ref) == pytest.approx(log_b0, rel=1e-12, abs=1e-15) if math.isfinite(log_b0) else float(at_ref) == log_b0


def test_length_factor_values():
    T = torch.tensor([0.0, 1.0, 9.0, 36.0])
    close(length_factor(T, "none", None), [1.0, 1.0, 1.0, 1.0])
    close(length_factor(T, "geo", 9.0), [0.0, 1 / 9, 1.0, 4.0])
    close(length_factor(T, "sqrt", 9.0), [0.0, 1 / 3, 1.0, 2.0])


def test_bound_range_metrics_skip_empty_rows():
    b = torch.tensor([5.0, -1.0, 2.0, 0.5], dtype=torch.float64)
    m = bound_range_metrics(b, torch.tensor([False, True, True, True]), "x")
    close(m["x_min"], -1.0)
    close(m["x_max"], 2.0)
    m = bound_range_metrics(b, torch.zeros(4, dtype=torch.bool), "x")
    assert float(m["x_min"]) == 0.0 and float(m["x_max"]) == 0.0
    m = bound_range_metrics(b[:0], torch.zeros(0, dtype=torch.bool), "x")
    assert float(m["x_min"]) == 0.0


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"length_calibration": "sqrt", "ref_len": 4.0, "level": "token"}, "needs level 'sequence'"),
    ({"length_calibration": "geo", "ref_len": 4.0, "level": "geometric"}, "needs level 'sequence'"),
    ({"length_calibration": "sqrt", "ref_len": None, "level": "sequence"}, "needs ref_len"),
    ({"length_calibration": "sqrt", "ref_len": 0.0, "level": "sequence"}, "needs ref_len"),
    ({"length_calibration": "sqrt", "ref_len": math.inf, "level": "sequence"}, "needs ref_len"),
    ({"length_calibration": "sqrt", "ref_len": True, "level": "sequence"}, "needs ref_len"),
    ({"length_calibration": "geo", "ref_len": 4.0, "length_drift": -0.1, "level": "sequence"}, "'sqrt' only"),
    ({"length_calibration": "none", "ref_len": None, "length_drift": -0.1, "level": "sequence"}, "'sqrt' only"),
    ({"length_calibration": "sqrt", "ref_len": 4.0, "length_drift": math.nan, "level": "sequence"}, "finite"),
    ({"length_calibration": "linear", "ref_len": 4.0, "level": "sequence"}, "unknown length_calibration"),
])
def test_bad_calibration_arguments_are_errors(kwargs, match):
    kw = {"length_drift": 0.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        check_length_calibration(kw["length_calibration"], kw["ref_len"], kw["length_drift"], level=kw["level"])


@pytest.mark.parametrize("name", ["tis", "mis", "icepop"])
def test_presets_refuse_bad_calibration_at_resolve_time(name):
    """`tether train` resolves the overrides before building anything: the bad combination fails there."""
    with pytest.raises(ValueError, match=rf"objective '{name}': length_calibration 'sqrt' needs ref_len"):
        get_preset(name).resolve({"level": "sequence", "length_calibration": "sqrt"})
    token_level = {} if name != "mis" else {"level": "token"}
    with pytest.raises(ValueError, match="needs level 'sequence'"):
        get_preset(name).resolve({**token_level, "length_calibration": "geo", "ref_len": 8})
    ok = get_preset(name).resolve({"level": "sequence", "length_calibration": "sqrt", "ref_len": 8})
    assert ok["length_calibration"] == "sqrt" and ok["ref_len"] == 8


# ------------------------------------------------------------------------------------------------
# the weights, against loops


def ref_range(vals):
    return (min(vals), max(vals)) if vals else (0.0, 0.0)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("rule", "drift"), RULES)
@pytest.mark.parametrize(("cap", "floor"), [(2.0, 0.0), (3.0, 0.5), (math.inf, 0.2)])
def test_calibrated_tis_weights_match_loop(seed, rule, drift, cap, floor):
    _, old, mu, _, mask = make_batch(seed)
    T0 = 3.0
    w, m = rc.truncated_is_weights(old, mu, mask, level="sequence", cap=cap, floor=floor, length_calibration=rule,
                                   ref_len=T0, length_drift=drift)
    assert torch.all(w[mask == 0] == 0)
    d = ref_delta(old, mu, mask)
    n = hi = lo = 0
    caps, floors = [], []
    for i, ts in enumerate(rows(mask)):
        lc, lf = ref_bound(log_or_inf(cap), len(ts), rule, T0, drift), ref_bound(log_or_inf(floor), len(ts), rule, T0,
                                                                                  drift)
        if ts:
            caps.append(lc)
            floors.append(lf)
        s = max(-CLAMP, min(CLAMP, seq_sum(d[i], ts)))
        for t in ts:
            n += 1
            hi += s > lc
            lo += s < lf
            close(w[i, t], math.exp(min(lc, max(lf, s))))
    close(m["tis/clipfrac_high"], hi / n)
    close(m["tis/clipfrac_low"], lo / n)
    if math.isfinite(cap):
        close([m["tis/calib_log_cap_min"], m["tis/calib_log_cap_max"]], ref_range(caps))
    else:
        assert "tis/calib_log_cap_min" not in m
    if floor > 0:
        close([m["tis/calib_log_floor_min"], m["tis/calib_log_floor_max"]], ref_range(floors))
    else:
        assert "tis/calib_log_floor_min" not in m


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("rule", "drift"), RULES)
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("veto", [1e-4, None])
def test_calibrated_mis_weights_match_loop(seed, rule, drift, weighted, veto):
    _, old, mu, _, mask = make_batch(seed)
    low, high, T0 = 0.4, 2.5, 2.0
    w, m = rc.masked_is_weights(old, mu, mask, level="sequence", low=low, high=high, weighted=weighted, veto=veto,
                                length_calibration=rule, ref_len=T0, length_drift=drift)
    assert torch.all(w[mask == 0] == 0)
    d = ref_delta(old, mu, mask)
    n = n_band = n_any = 0
    highs, lows = [], []
    for i, ts in enumerate(rows(mask)):
        lo = ref_bound(math.log(low), len(ts), rule, T0, drift)
        hi = ref_bound(math.log(high), len(ts), rule, T0, drift)
        if ts:
            highs.append(hi)
            lows.append(lo)
        s = seq_sum(d[i], ts)
        vetoed = veto is not None and any(math.exp(d[i][t]) < veto for t in ts)
        for t in ts:
            n += 1
            in_band = lo <= s <= hi
            n_band += not in_band
            kept = in_band and not vetoed
            n_any += not kept
            expected = (math.exp(max(-CLAMP, min(CLAMP, s))) if weighted else 1.0) if kept else 0.0
            close(w[i, t], expected)
    close(m["mis/maskfrac_band"], n_band / n)
    close(m["mis/maskfrac"], n_any / n)
    close([m["mis/calib_log_high_min"], m["mis/calib_log_high_max"]], ref_range(highs))
    close([m["mis/calib_log_low_min"], m["mis/calib_log_low_max"]], ref_range(lows))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("level", "rule", "drift"), [("sequence", "none", 0.0), ("geometric", "none", 0.0),
                                                      ("sequence", "geo", 0.0), ("sequence", "sqrt", -0.05)])
def test_icepop_sequence_levels_match_loop(seed, level, rule, drift):
    _, old, mu, _, mask = make_batch(seed)
    low, high, T0 = 0.3, 4.0, 2.0
    w, m = rc.icepop_weights(old, mu, mask, low=low, high=high, level=level, length_calibration=rule, ref_len=T0,
                             length_drift=drift)
    assert torch.all(w[mask == 0] == 0)
    d = ref_delta(old, mu, mask)
    n = n_low = n_high = 0
    for i, ts in enumerate(rows(mask)):
        s = seq_sum(d[i], ts)
        x = s / len(ts) if (level == "geometric" and ts) else s
        log_w = x if level == "geometric" else max(-CLAMP, min(CLAMP, s))
        lo = ref_bound(math.log(low), len(ts), rule, T0, drift)
        hi = ref_bound(math.log(high), len(ts), rule, T0, drift)
        for t in ts:
            n += 1
            n_low += x < lo
            n_high += x > hi
            close(w[i, t], math.exp(log_w) if lo <= x <= hi else 0.0)
    close(m["icepop/maskfrac_low"], n_low / n)
    close(m["icepop/maskfrac_high"], n_high / n)
    assert ("icepop/calib_log_high_min" in m) == (rule != "none")


def test_calibration_at_the_reference_length_is_the_fixed_threshold():
    """Every row of length ref_len: each rule gives exactly the uncalibrated weights."""
    _, old, mu, _, _ = make_batch(4)
    mask = torch.ones_like(old)
    T0 = float(mask.shape[1])
    for rule, drift in RULES:
        kw = {"length_calibration": rule, "ref_len": T0, "length_drift": drift}
        w, _ = rc.truncated_is_weights(old, mu, mask, level="sequence", cap=3.0, floor=0.4, **kw)
        w0, _ = rc.truncated_is_weights(old, mu, mask, level="sequence", cap=3.0, floor=0.4)
        close(w, w0)
        w, _ = rc.masked_is_weights(old, mu, mask, low=0.6, high=1.8, **kw)
        close(w, rc.masked_is_weights(old, mu, mask, low=0.6, high=1.8)[0])
        w, _ = rc.icepop_weights(old, mu, mask, low=0.6, high=1.8, level="sequence", **kw)
        close(w, rc.icepop_weights(old, mu, mask, low=0.6, high=1.8, level="sequence")[0])


def test_sqrt_and_geo_disagree_with_fixed_away_from_the_reference():
    """A long row falls outside a fixed [0.5, 2] band that the calibrated bands (meant at T0 = 1) keep: the
    rule is not a no-op."""
    T = 16
    old = torch.zeros(1, T, dtype=torch.float64)
    mu = old - 0.1  # delta = 0.1 per token, S = 1.6 > log 2
    mask = torch.ones_like(old)
    fixed, _ = rc.masked_is_weights(old, mu, mask, low=0.5, high=2.0, veto=None)
    assert float(fixed.sum()) == 0.0
    for rule in ("geo", "sqrt"):  # log 2 * 16 = 11.1 and log 2 * 4 = 2.77, both above 1.6
        w, _ = rc.masked_is_weights(old, mu, mask, low=0.5, high=2.0, veto=None, length_calibration=rule, ref_len=1)
        close(w, torch.full_like(w, math.exp(1.6)))


# ------------------------------------------------------------------------------------------------
# presets: value and gradient


def ref_seq_weights(old, mu, mask, name, hp):
    """The detached per-token weight each preset puts on l^PPO, written from its equation."""
    d = ref_delta(old, mu, mask)
    B, T = mask.shape
    w = torch.zeros(B, T, dtype=torch.float64)
    rule, T0, drift = hp["length_calibration"], hp["ref_len"], hp.get("length_drift", 0.0)
    for i, ts in enumerate(rows(mask)):
        s = seq_sum(d[i], ts)
        sc = max(-CLAMP, min(CLAMP, s))
        bound = {"tis": (hp.get("floor", 0.0), hp.get("cap", 2.0)), "mis": (0.5, 2.0), "icepop": (0.5, 5.0)}[name]
        lo, hi = (ref_bound(log_or_inf(b), len(ts), rule, T0, drift) for b in bound)
        vetoed = name == "mis" and any(math.exp(d[i][t]) < 1e-4 for t in ts)
        for t in ts:
            if name == "tis":
                w[i, t] = math.exp(min(hi, max(lo, sc)))
            elif lo <= s <= hi and not vetoed:
                w[i, t] = math.exp(sc)
    return w


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("name", "hp"), [
    ("tis", {"level": "sequence", "length_calibration": "sqrt", "ref_len": 3}),
    ("tis", {"level": "sequence", "length_calibration": "geo", "ref_len": 2, "cap": 1.5, "floor": 0.5}),
    ("mis", {"length_calibration": "sqrt", "ref_len": 4, "length_drift": -0.05}),
    ("mis", {"length_calibration": "geo", "ref_len": 5}),
    ("icepop", {"level": "sequence", "length_calibration": "sqrt", "ref_len": 2}),
])
def test_calibrated_preset_value_and_gradient(seed, name, hp):
    theta, old, mu, adv, mask = make_batch(seed, spread=0.3)
    loss, g, metrics = preset_loss_and_grad(name, theta, old, mu, adv, mask, **hp)
    w_ref = ref_seq_weights(old, mu, mask, name, hp)
    ppo = ref_ppo(theta, old, adv, mask)
    close(loss, ref_token_mean(w_ref * ppo, mask))
    # the weight is detached: the gradient is w_t times the PPO gradient
    close(g, w_ref * ppo_token_grad(theta, old, adv, mask, eps_low=0.2, eps_high=0.2, dual_clip_c=3.0))
    assert any("calib_log" in k for k in metrics)
    for k, v in metrics.items():
        assert v.dim() == 0 and not v.requires_grad and torch.isfinite(v), k


@pytest.mark.parametrize("name", ["tis", "mis", "icepop"])
def test_calibrated_presets_on_an_empty_batch(name):
    theta, old, mu, adv, mask = make_batch(0, full_mask_off=True)
    hp = {"level": "sequence", "length_calibration": "sqrt", "ref_len": 4}
    loss, g, metrics = preset_loss_and_grad(name, theta, old, mu, adv, mask, **hp)
    assert float(loss) == 0.0 and torch.equal(g, torch.zeros_like(g))
    assert all(torch.isfinite(v) for v in metrics.values())


def test_gradient_check_of_a_calibrated_preset():
    """torch.autograd.gradcheck on the preset's loss w.r.t. log pi_theta (the weights are constants)."""
    theta, old, mu, adv, mask = make_batch(1, extreme=False, spread=0.3)
    preset = get_preset("mis")

    def f(th):
        return preset(inputs_of(th, old, mu, adv, mask), length_calibration="sqrt", ref_len=3)[0]

    assert torch.autograd.gradcheck(f, (theta.clone().requires_grad_(),), eps=1e-6, atol=1e-8)


# ------------------------------------------------------------------------------------------------
# the property the sqrt rule is derived from


def test_sqrt_rule_keeps_the_same_mass_at_every_length_under_iid_noise():
    """delta_t i.i.d. N(m, s^2) with m = -s^2/2 (so E exp(delta) = 1): the sqrt band with the drift term keeps
    the same fraction of sequences at T = 4 and T = 400 (about Phi(1) - Phi(-1) = 0.683 for a band of +-1 sd at
    T0 = 4); a fixed band keeps far fewer at T = 400, the geo band nearly all."""
    g = torch.Generator().manual_seed(0)
    s, N, T0 = 0.2, 4000, 4
    m = -s * s / 2
    half = s * math.sqrt(T0)  # +-1 sd of S at T0 around its mean
    low, high = math.exp(m * T0 - half), math.exp(m * T0 + half)
    kept = {}
    for T in (4, 400):
        delta = m + s * torch.randn(N, T, generator=g, dtype=torch.float64)
        old, mu, mask = delta, torch.zeros_like(delta), torch.ones_like(delta)
        for rule, drift in (("none", 0.0), ("geo", 0.0), ("sqrt", m)):
            w, _ = rc.masked_is_weights(old, mu, mask, low=low, high=high, weighted=False, veto=None,
                                        length_calibration=rule, ref_len=None if rule == "none" else T0,
                                        length_drift=drift)
            kept[rule, T] = float(w[:, 0].mean())
    target = math.erf(1 / math.sqrt(2))
    for T in (4, 400):
        assert kept["sqrt", T] == pytest.approx(target, abs=0.03)
    assert kept["none", 400] < 0.15
    assert kept["geo", 400] > 0.99


@pytest.mark.parametrize("name", ["tis", "mis", "icepop"])
def test_verl_weights_slot_carries_the_calibration(name):
    """tether inside verl (``rollout_is_weights``) computes the same calibrated weight as the preset."""
    from tether.adapters.verl import rollout_is_weights

    _, old, mu, _, mask = make_batch(0, extreme=False, spread=0.6)
    hp = {"level": "sequence", "length_calibration": "geo", "ref_len": 1}
    w = rollout_is_weights(name, old, mu, mask, **hp)
    close(w, ref_seq_weights(old, mu, mask, name, hp))
    assert not torch.allclose(w, rollout_is_weights(name, old, mu, mask, level="sequence"))
