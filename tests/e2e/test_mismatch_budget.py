"""Each budget action and the auto correction have their observable effect in a short real run.

The engine's log-probs get a synthetic drift: log mu += drift * step * N(0, 1) per token (seeded), so
step 0 is clean (pi_old = mu up to numerics) and the mismatch grows from step 1 on.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tether.train import setup
from tether.train.checkpoint import load_latest_checkpoint
from tether.train.config import TrainConfig
from tether.train.sync import TrainingStopped, train

pytestmark = pytest.mark.e2e
SMALL = dict(steps=2, prompts_per_step=2, group_size=4, max_new_tokens=6, warmstart_steps=20, eval_size=5,
             progress=False, threads=2, checkpoint_every=1, lr=1e-4, plots=False)


@pytest.fixture
def drift(monkeypatch):
    generate = setup.generate

    def drifting(policy, examples, cfg, seed):
        rollout = generate(policy, examples, cfg, seed)
        step = int(rollout.version_BT.max())
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(rollout.logp_mu_BT.shape, generator=g, dtype=rollout.logp_mu_BT.dtype)
        return dataclasses.replace(rollout, logp_mu_BT=rollout.logp_mu_BT + 0.5 * step * noise * rollout.loss_mask_BT)

    monkeypatch.setattr(setup, "generate", drifting)


def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_lower_lr_and_tighten_act_only_after_the_drift(tmp_path, drift):
    run = tmp_path / "lr"
    summary = train(TrainConfig.from_flat(objective="tis", out=str(run), budget_max_kl=0.02, budget_action="lower_lr", **SMALL))
    rows = _rows(run)
    assert [r["budget/alarms"] for r in rows] == [0, 1]  # clean step 0, drifted step 1
    assert [r["lr"] for r in rows] == pytest.approx([1e-4, 5e-5])
    assert summary["count/budget_alarm_steps"] == 1

    run = tmp_path / "tighten"
    train(TrainConfig.from_flat(objective="tis", out=str(run), budget_max_kl=0.02, budget_action="tighten", **SMALL))
    rows = _rows(run)
    assert [r["objective/cap"] for r in rows] == pytest.approx([2.0, 1.5])  # tis cap 2 -> 1 + (2 - 1) / 2
    assert [r["objective/eps_high"] for r in rows] == pytest.approx([0.2, 0.1])
    assert [r["lr"] for r in rows] == pytest.approx([1e-4] * 2)


def test_stop_names_the_metric_and_keeps_the_last_checkpoint(tmp_path, drift):
    run = tmp_path / "stop"
    with pytest.raises(TrainingStopped, match=r"step 1: mismatch budget exceeded: meter/total/kl_k3 = [0-9.e-]+ > 0.02"):
        train(TrainConfig.from_flat(objective="tis", out=str(run), budget_max_kl=0.02, budget_action="stop", **SMALL))
    assert load_latest_checkpoint(run)["run_state"]["step"] == 1  # step 0 completed, step 1 stopped before its update
    rows = _rows(run)  # step 1's measurements are logged before the stop, marked as the stopping step
    assert [r["step"] for r in rows] == [0, 1]
    assert rows[1]["budget/stopped"] == 1 and rows[1]["budget/alarm/max_kl"] == 1 and rows[1]["meter/total/kl_k3"] > 0.02
    assert "budget/stopped" not in rows[0]


def test_auto_objective_logs_a_choice_that_follows_the_drift(tmp_path, drift):
    run = tmp_path / "auto"
    train(TrainConfig.from_flat(objective="auto", out=str(run), **{**SMALL, "prompts_per_step": 17}))
    rows = _rows(run)
    levels = [r["auto/level"] for r in rows]
    assert levels == ["sequence", "token"]  # 68 clean sequences (>= 64 effective), then the drift collapses ESS_seq
    assert all(r["objective/threshold"] == r["auto/threshold"] and r["auto/reason"] for r in rows)
