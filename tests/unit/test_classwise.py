"""Class-wise rewards, constraint terms, the PI controller and the centred-rank + EMA advantage
(methods.md (a)11) against plain loop references."""

import math
import random

import pytest
import torch

from tether.objectives.advantages import centred_rank, rank_ema
from tether.objectives.classwise import (
    bin_classes,
    classwise_reward,
    constraint_terms,
    ema,
    pi_update,
    recall_far,
)

BOUNDS = (0.0, 15.0, 35.0, 75.0, 800.0)


def ref_class(v, bounds):
    if math.isnan(v):
        return -1
    k = 0
    for i in range(1, len(bounds) - 1):
        if v >= bounds[i]:
            k = i
    return k


def rows(n=200, seed=0):
    rng = random.Random(seed)
    vals = [rng.choice([float("nan"), -3.0, 15.0, 35.0, 800.0, 900.0]) if rng.random() < 0.2
            else rng.uniform(-10, 900) for _ in range(n)]
    gold = [rng.uniform(0, 300) for _ in range(n)]
    return vals, gold


def test_bins_match_a_loop_and_bad_bounds_are_refused():
    vals, _ = rows()
    got = bin_classes(torch.tensor(vals, dtype=torch.float64), BOUNDS).tolist()
    assert got == [ref_class(v, BOUNDS) for v in vals]
    for bad in ([1.0], [0.0, 0.0, 1.0], [0.0, float("inf")], [3.0, 1.0]):
        with pytest.raises(ValueError, match="strictly ascending"):
            bin_classes(torch.zeros(2), bad)


@pytest.mark.parametrize("h", [1, 2, 3])
def test_reward_recall_far_and_constraints_match_loops(h):
    vals, gold = rows(seed=h)
    p = bin_classes(torch.tensor(vals, dtype=torch.float64), BOUNDS)
    g = bin_classes(torch.tensor(gold, dtype=torch.float64), BOUNDS)
    cw, ew, fa, lr, lf, floor, tgt = 0.4, 0.6, 0.3, 0.7, 1.3, 0.6, 0.18
    r = classwise_reward(p, g, high_from=h, coarse_w=cw, exact_w=ew, fa_penalty=fa)
    s = constraint_terms(p, g, high_from=h, lam_rec=lr, lam_far=lf, recall_floor=floor, far_target=tgt)
    tp = fp = pos = 0
    for i, (pi, gi) in enumerate(zip(p.tolist(), g.tolist())):
        hp, hg = pi >= h, gi >= h
        want = cw * (hp == hg) + ew * (pi == gi and pi != -1) - fa * (hp and not hg)
        assert r[i].item() == pytest.approx(want, abs=1e-12)
        want_s = (lr * ((1.0 if hp else 0.0) - floor) if hg else 0.0) - (lf * max(0.0, (0.0 if hg else 1.0) - tgt)
                                                                          if hp else 0.0)
        assert s[i].item() == pytest.approx(want_s, abs=1e-12)
        tp += hp and hg
        fp += hp and not hg
        pos += hg
    rec, far = recall_far(p, g, high_from=h)
    assert rec == pytest.approx(tp / pos)
    assert far == pytest.approx(fp / (tp + fp))


def test_rates_with_empty_denominators_are_zero_and_unread_is_never_high():
    p = torch.tensor([-1, -1])
    g = torch.tensor([0, 0])
    assert recall_far(p, g, high_from=0) == (0.0, 0.0)
    assert classwise_reward(p, torch.tensor([0, 3]), high_from=2, coarse_w=1, exact_w=1, fa_penalty=1).tolist() == [1, 0]


def test_pi_update_follows_its_equation_and_clips():
    x, i = 0.2, 0.0
    xr, ir = 0.2, 0.0
    for e in [0.5, -0.1, 0.3, 2.0, -4.0]:
        x, i = pi_update(x, i, e, kp=0.05, ki=0.01, decay=0.95, lo=0.0, hi=0.25)
        ir = 0.95 * ir + e
        xr = min(max(xr * math.exp(0.05 * e + 0.01 * ir), 0.0), 0.25)
        assert (x, i) == pytest.approx((xr, ir))
    assert x <= 0.25 and ema(None, 3.0, 0.1) == 3.0 and ema(1.0, 3.0, 0.25) == pytest.approx(1.5)


def ref_rank(r, grp, inc):
    out = []
    for i in range(len(r)):
        others = [j for j in range(len(r)) if j != i and grp[j] == grp[i] and inc[j]]
        if not others:
            out.append(0.0)
            continue
        rank = sum(1.0 if r[j] < r[i] else 0.5 if r[j] == r[i] else 0.0 for j in others)
        out.append(2 * rank / len(others) - 1)
    return out


def test_centred_rank_matches_a_loop_and_fakers_argsort_without_ties():
    rng = random.Random(3)
    r = [rng.choice([0.0, 0.5, 1.0, rng.random()]) for _ in range(30)]
    grp = [rng.randrange(5) for _ in range(30)]
    inc = [rng.random() < 0.8 for _ in range(30)]
    got = centred_rank(torch.tensor(r), torch.tensor(grp), torch.tensor(inc)).tolist()
    assert got == pytest.approx(ref_rank(r, grp, inc), abs=1e-6)
    x = torch.tensor([0.3, -1.0, 2.0, 0.7])
    faker = 2.0 * (torch.argsort(torch.argsort(x)).double() / 3 - 0.5)
    assert centred_rank(x, torch.zeros(4, dtype=torch.long)).double().tolist() == pytest.approx(faker.tolist())


def test_rank_ema_matches_a_loop_over_steps():
    rng = random.Random(5)
    m, v, mr, vr, alpha, c = 0.0, 1e-6, 0.0, 1e-6, 0.05, 0.5
    for _ in range(4):
        r = [rng.random() for _ in range(8)]
        grp = [i // 4 for i in range(8)]
        a, m, v = rank_ema(torch.tensor(r, dtype=torch.float64), torch.tensor(grp), ema_mean=m, ema_var=v,
                           alpha=alpha, coeff=c)
        rbar = sum(r) / 8
        mr = (1 - alpha) * mr + alpha * rbar
        vr = (1 - alpha) * vr + alpha * (rbar - mr) ** 2
        rk = ref_rank(r, grp, [True] * 8)
        want = [(1 - c) * rk[i] + c * (r[i] - mr) / (vr ** 0.5 + 1e-6) for i in range(8)]
        assert (m, v) == pytest.approx((mr, vr), rel=1e-12)
        assert a.tolist() == pytest.approx(want, rel=1e-9)
    a, m2, v2 = rank_ema(torch.tensor([1.0]), torch.tensor([0]), torch.tensor([False]), ema_mean=m, ema_var=v,
                         alpha=alpha, coeff=c)
    assert (m2, v2) == (m, v)


def test_the_run_stage_applies_this_steps_multipliers_then_updates_them_from_the_rate_emas():
    from tether.train.classwise import ClasswiseReward, KLCoefController
    from tether.train.config import TrainConfig

    cfg = TrainConfig.from_flat(class_bounds="0,10,20,40,82", class_fa_penalty=0.5, class_kp=1.0, class_ki=0.5,
                                kl_placement="loss", kl_coef=0.01, kl_target=0.1)
    state: dict = {}
    stage = ClasswiseReward(cfg, lambda: state)
    texts, answers = ["25", "x", "3", "50"], ["30", "12", "45", "5"]  # hit, unread, miss, false alarm
    r1, m1 = stage(texts, answers)
    plain = [1.0, 0.5, 0.0, -0.5]  # coarse + exact; unread vs a low gold (class 1): coarse; miss: 0; false alarm
    # constraints with lam 0.2: gold-high rows 0 and 2 get 0.2 (1[high p] - 0.6); predicted-high rows 0 and 3 get
    # -0.2 max(0, 1[gold low] - 0.18)
    want = [plain[0] + 0.2 * 0.4, plain[1], plain[2] - 0.2 * 0.6, plain[3] - 0.2 * 0.82]
    assert r1.double().tolist() == pytest.approx(want, abs=1e-6)
    assert (m1["class/recall"], m1["class/far"]) == (0.5, 0.5)
    lam_rec, i_rec = pi_update(0.2, 0.0, 0.6 - 0.5, kp=1.0, ki=0.5, decay=0.95, lo=0.0, hi=3.0)
    lam_far, i_far = pi_update(0.2, 0.0, 0.5 - 0.18, kp=1.0, ki=0.5, decay=0.95, lo=0.0, hi=3.0)
    assert (state["lam_rec"], state["lam_far"]) == pytest.approx((lam_rec, lam_far))
    r2, _ = stage(texts, answers)  # the second step uses the moved multipliers
    assert r2[0].item() == pytest.approx(plain[0] + lam_rec * 0.4, abs=1e-6)
    kl = KLCoefController(cfg.kl, lambda: state)
    coef, m = kl.coef(0.3)  # above target: the coefficient rises from 0.01
    assert coef == pytest.approx(min(0.1, 0.01 * math.exp(0.08 * 0.2 + 0.02 * 0.2)))
    assert m["kl/coef"] == coef and state["kl_coef"] == coef


@pytest.mark.parametrize("flat,field", [
    (dict(class_bounds="5,1"), "class_bounds"),
    (dict(class_bounds="0,a"), "class_bounds"),
    (dict(class_bounds="0,10,20", class_high_from=2), "class_high_from"),
    (dict(class_bounds="0,10,20", class_recall_floor=1.5), "class_recall_floor"),
    (dict(class_bounds="0,10,20", class_lambda_init=4.0), "class_lambda_init"),
    (dict(class_bounds="0,10,20", class_fa_penalty=-1.0), "class_fa_penalty"),
    (dict(class_high_from=1), "class_high_from"),  # a class setting without class_bounds
    (dict(class_bounds="0,10,20,30", mode="async"), "class_bounds"),
    (dict(class_bounds="0,10,20,30", env="frozenlake"), "class_bounds"),
    (dict(advantage="rank_emma"), "advantage"),
    (dict(adv_ema_alpha=0.0), "adv_ema_alpha"),
    (dict(adv_ema_coeff=1.5), "adv_ema_coeff"),
    (dict(kl_target=0.1), "kl_target"),  # needs kl_placement
    (dict(kl_placement="loss", kl_coef=0.5, kl_target=0.1), "kl_coef"),  # outside [kl_coef_min, kl_coef_max]
    (dict(kl_placement="loss", kl_coef=0.01, kl_target=-1.0), "kl_target"),
    (dict(kl_placement="loss", kl_coef=0.01, kl_target=0.1, mode="async", old_logits="loglinear"), "kl_target"),
])
def test_classwise_flags_are_refused_at_the_edge_naming_the_field(flat, field):
    from tether.train.config import TrainConfig

    with pytest.raises(ValueError, match=field):
        TrainConfig.from_flat(**flat)
