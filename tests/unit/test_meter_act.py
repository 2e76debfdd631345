"""The budget fires on drift and not on a clean batch; the auto rule's choice follows the mismatch."""

from __future__ import annotations

import math

import pytest
import torch

from tether.meter import measure
from tether.meter.auto import AutoRule, CorrectionLevel, choose_correction
from tether.meter.budget import BudgetAction, MismatchBudget, check_budget

pytestmark = pytest.mark.unit


def _stats(noise: float, B: int = 64, T: int = 32, seed: int = 0, spike: float | None = None, profiles=False):
    g = torch.Generator().manual_seed(seed)
    mu = torch.log(torch.rand(B, T, generator=g, dtype=torch.float64).clamp(min=1e-3))
    old = mu + noise * torch.randn(B, T, generator=g, dtype=torch.float64)
    if spike is not None:
        old[3, 5] = mu[3, 5] + spike
    mask = torch.ones(B, T, dtype=torch.bool)
    return measure(mask_BT=mask, logp_old_BT=old, logp_mu_BT=mu, profiles=profiles)


BUDGET = MismatchBudget(min_ess_token=0.9, max_abs_logr_p99=0.5, max_kl=0.01, action="stop")


def test_budget_silent_on_clean_batch_and_fires_on_drift():
    assert check_budget(_stats(0.01), BUDGET) == []
    alarms = check_budget(_stats(0.6), BUDGET)
    assert {a.field for a in alarms} == {"min_ess_token", "max_abs_logr_p99", "max_kl"}
    a = next(a for a in alarms if a.field == "max_kl")
    assert a.metric == "meter/total/kl_k3" and a.action is BudgetAction.STOP and a.value > 0.01
    assert "meter/total/kl_k3" in a.message and "stop" in a.message and "max_kl" in a.message


def test_budget_drift_over_steps_fires_once_it_crosses():
    fired = [bool(check_budget(_stats(0.02 * s, seed=s), MismatchBudget(max_kl=0.01))) for s in range(12)]
    first = fired.index(True)
    assert 0 < first and all(fired[first:])  # kl_k3 ~ noise^2/2 crosses 0.01 near noise 0.14 (s = 7)


def test_budget_non_finite_fires_missing_key_does_not():
    assert check_budget({"meter/total/ess_token": float("nan")}, MismatchBudget(min_ess_token=0.5))[0].field == "min_ess_token"
    assert check_budget({}, MismatchBudget(min_ess_token=0.5)) == []
    assert MismatchBudget(ratio="engine", max_kl=1.0).keys == ["meter/engine/kl_k3"]


def test_budget_validation_names_the_field():
    with pytest.raises(ValueError, match="min_ess_token"):
        MismatchBudget(min_ess_token=1.5)
    with pytest.raises(ValueError, match="action"):
        MismatchBudget(action="explode")
    with pytest.raises(ValueError, match="max_kl"):
        MismatchBudget(max_kl=-1.0)
    with pytest.raises(ValueError, match="'max_kll'"):
        MismatchBudget.from_dict({"max_kll": 1.0})
    assert MismatchBudget.from_dict({"max_kl": 0.1, "action": "lower_lr"}).action is BudgetAction.LOWER_LR


def test_auto_choice_changes_with_the_injected_mismatch():
    small = choose_correction(_stats(0.01, B=128, T=16))
    assert small.level is CorrectionLevel.SEQUENCE and small.threshold == 2.0
    large = choose_correction(_stats(0.5, B=128, T=16))
    assert large.level is CorrectionLevel.TOKEN
    # the cap follows the token tail: exp(p99) of N(0, 0.5^2) ~ exp(1.16) ~ 3.2
    assert 2.5 < large.threshold < 4.0 and "logr_p99" in large.reason
    broken = choose_correction(_stats(0.01, B=128, T=16, spike=-20.0))
    assert broken.level is CorrectionLevel.GEOMETRIC and 1e-3 <= broken.threshold <= math.log(2)


def test_auto_level_depends_on_effective_sequences_not_only_ess():
    stats = {"meter/total/n_tokens": 100.0, "meter/total/abs_logr_max": 1.0, "meter/total/ess_seq": 0.5,
             "meter/total/seq_logr_p99": math.log(5.0), "meter/total/logr_p99": math.log(1.5)}
    few = choose_correction({**stats, "meter/total/n_seqs": 64.0})  # 32 effective sequences
    many = choose_correction({**stats, "meter/total/n_seqs": 1024.0})  # 512
    assert few.level is CorrectionLevel.TOKEN and few.threshold == 2.0  # exp(p99)=1.5 clamped up
    assert many.level is CorrectionLevel.SEQUENCE and many.threshold == pytest.approx(5.0)
    assert choose_correction({**stats, "meter/total/n_seqs": 64.0}, AutoRule(min_effective_seqs=16)).level is CorrectionLevel.SEQUENCE


def test_auto_empty_batch_and_missing_statistic():
    assert choose_correction(_stats(0.1, B=2, T=3) | {"meter/total/n_tokens": 0.0}).reason.startswith("empty")
    with pytest.raises(ValueError, match="meter/engine/n_tokens"):
        choose_correction({}, ratio="engine")
    with pytest.raises(ValueError, match="cap_min"):
        AutoRule(cap_min=0.5)
