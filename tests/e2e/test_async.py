"""The async loop end to end on the built-in model (issue 6): lag 0 is the sync loop bit for bit,
a resumed async run equals an uninterrupted one, `drop` refills the batch (and still resumes bitwise),
and the staleness bound holds in real-time mode under a slow reward function.

To stay within seconds the model is not warm-started; a synthetic reward (share of digits in the
completion) replaces exact match so the untrained model still gets non-zero advantages and updates.
"""

import json
import os
import signal
import time

import pytest
import torch

from tether.train import async_loop, setup, sync
from tether.train.checkpoint import load_checkpoint_dir
from tether.train.config import OldLogits, StalenessPolicy, TrainConfig, TrainMode
from tether.train.run import Run
from tether.train.signals import Interrupted

pytestmark = pytest.mark.e2e
SMALL = dict(prompts_per_step=4, group_size=4, max_new_tokens=6, warmstart_steps=0, eval_size=4, threads=2,
             seed=5, progress=False, checkpoint_every=2, lr=1e-3, plots=False)


def digit_share(run, rollout, examples):
    """``Run.score`` with the share of digits as the one reward (non-zero advantages on an untrained model)."""
    texts = setup.completions(run.policy, rollout)
    return torch.tensor([sum(c.isdigit() for c in t) / max(len(t), 1) for t in texts]), 0, {}, {}


@pytest.fixture(autouse=True)
def synthetic_reward(monkeypatch):
    monkeypatch.setattr(Run, "score", digit_share)


def _state(run, step):
    return load_checkpoint_dir(run / "checkpoints" / f"step_{step:06d}").state


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_lag_zero_async_is_the_sync_loop(tmp_path):
    sync.train(TrainConfig.from_flat(**SMALL, steps=3, out=str(tmp_path / "sync"), objective="ppo"))
    async_loop.train(TrainConfig.from_flat(**SMALL, steps=3, out=str(tmp_path / "async"), objective="ppo",
                                 mode=TrainMode.ASYNC, max_staleness=0))
    a, b = _state(tmp_path / "sync", 3), _state(tmp_path / "async", 3)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert not torch.equal(a["model"]["lm_head.weight"], _state(tmp_path / "sync", 2)["model"]["lm_head.weight"])
    for ra, rb in zip(_metrics(tmp_path / "sync"), _metrics(tmp_path / "async")):
        assert ra["reward/mean"] == rb["reward/mean"] and ra["loss"] == rb["loss"] != 0
        assert rb["meter/version/age_max"] == 0
        assert ra["mismatch/abs_logp_diff_max"] == rb["mismatch/abs_logp_diff_max"] >= rb["mismatch/abs_logp_diff_mean"]
    sa, sb = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("sync", "async"))
    assert sa["mismatch/abs_logp_diff_max"] == sb["mismatch/abs_logp_diff_max"] is not None


def test_async_resume_is_bitwise(tmp_path):
    cfg = dict(SMALL, mode=TrainMode.ASYNC, max_staleness=1, rollout_lag=2, staleness_policy=StalenessPolicy.DOWNWEIGHT,
               partial_chunk_tokens=2, old_logits=OldLogits.SNAPSHOT, objective="decoupled_ppo")
    async_loop.train(TrainConfig.from_flat(**cfg, steps=4, out=str(tmp_path / "full")))
    async_loop.train(TrainConfig.from_flat(**cfg, steps=2, out=str(tmp_path / "cut")))
    async_loop.train(TrainConfig.from_flat(**cfg, steps=4, resume=str(tmp_path / "cut")))
    a, b = _state(tmp_path / "full", 4), _state(tmp_path / "cut", 4)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    full = _metrics(tmp_path / "full")
    assert [r["loss"] for r in full] == [r["loss"] for r in _metrics(tmp_path / "cut")]
    # lag 2 > k = 1: the oldest tokens of steps >= 2 are down-weighted, and partial rollouts span versions
    assert sum(r["async/downweighted_tokens"] for r in full) > 0
    assert any(r["async/version_min"] < r["step"] - 1 for r in full)


def test_sigterm_stops_async_at_a_step_boundary_and_resumes_bitwise(tmp_path, monkeypatch):
    """Issue 13 item 11: SIGTERM (sent here from the rollout thread, while it scores batch 1) lets the
    trainer finish its step, checkpoints at that boundary (between the regular ones), and raises
    ``Interrupted``; the resume equals the uninterrupted run bit for bit."""
    cfg = dict(SMALL, mode=TrainMode.ASYNC, max_staleness=1, old_logits=OldLogits.SNAPSHOT, objective="decoupled_ppo",
               checkpoint_every=100)
    async_loop.train(TrainConfig.from_flat(**cfg, steps=4, out=str(tmp_path / "full")))
    scored = []

    def score_then_sigterm(*args, **kwargs):
        scored.append(1)
        if len(scored) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return digit_share(*args, **kwargs)

    monkeypatch.setattr(Run, "score", score_then_sigterm)
    with pytest.raises(Interrupted) as stopped:
        async_loop.train(TrainConfig.from_flat(**cfg, steps=4, out=str(tmp_path / "cut")))
    step = stopped.value.step
    assert stopped.value.signum == signal.SIGTERM and 1 <= step < 4
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text() == f"step_{step:06d}"
    monkeypatch.setattr(Run, "score", digit_share)
    async_loop.train(TrainConfig.from_flat(**cfg, steps=4, resume=str(tmp_path / "cut")))
    a, b = _state(tmp_path / "full", 4), _state(tmp_path / "cut", 4)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [r["loss"] for r in _metrics(tmp_path / "full")] == [r["loss"] for r in _metrics(tmp_path / "cut")]


def test_drop_refills_the_batch_with_fresh_groups_and_resumes_bitwise(tmp_path, monkeypatch):
    """Under `drop` with the engine 2 versions ahead of a bound of 1 (and a slow reward), every group of
    steps >= 2 is too old and dropped; the trainer refills the batch with fresh groups at its own
    version, so every trained batch is full and dropped == refilled, step by step and in the counters.
    The refill is seeded and uses the restored weights, so a resumed run still equals an uninterrupted one."""
    def slow_score(*args, **kwargs):
        time.sleep(0.05)
        return digit_share(*args, **kwargs)

    monkeypatch.setattr(Run, "score", slow_score)
    cfg = dict(SMALL, mode=TrainMode.ASYNC, max_staleness=1, rollout_lag=2, staleness_policy=StalenessPolicy.DROP,
               old_logits=OldLogits.SNAPSHOT, objective="decoupled_ppo")
    full = async_loop.train(TrainConfig.from_flat(**cfg, steps=4, out=str(tmp_path / "full")))
    rows = _metrics(tmp_path / "full")
    groups = SMALL["prompts_per_step"]
    assert [r["async/dropped_groups"] for r in rows] == [0, 0, groups, groups]
    for r in rows:
        assert r["async/batch_groups"] == groups
        assert r["async/refilled_groups"] == r["async/dropped_groups"]
        assert r["meter/version/age_max"] <= 1  # the refilled tokens are fresh: nothing beyond the bound is trained
    assert full["count/stale_dropped_groups"] == full["count/stale_refilled_groups"] == 2 * groups
    assert rows[2]["async/dropped_reward_mean"] == rows[2]["async/dropped_reward_mean"]  # the bias is still measured
    async_loop.train(TrainConfig.from_flat(**cfg, steps=2, out=str(tmp_path / "cut")))
    async_loop.train(TrainConfig.from_flat(**cfg, steps=4, resume=str(tmp_path / "cut")))
    a, b = _state(tmp_path / "full", 4), _state(tmp_path / "cut", 4)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [r["loss"] for r in rows] == [r["loss"] for r in _metrics(tmp_path / "cut")]


def test_staleness_bound_holds_in_real_time_mode_with_a_slow_reward(tmp_path, monkeypatch):
    def slow_score(*args, **kwargs):
        time.sleep(0.3)
        return digit_share(*args, **kwargs)

    monkeypatch.setattr(Run, "score", slow_score)
    k = 1
    async_loop.train(TrainConfig.from_flat(**SMALL, steps=5, out=str(tmp_path / "rt"), mode=TrainMode.ASYNC, max_staleness=k,
                                 freshest_weights=True, partial_chunk_tokens=2))
    rows = _metrics(tmp_path / "rt")
    assert len(rows) == 5
    for r in rows:
        assert r["meter/version/age_max"] <= k and r["async/version_min"] >= r["step"] - k
        assert r["async/stale_tokens"] == 0
    assert sum(r["async/producer_wait_s"] for r in rows) >= 0.0
    assert sum(r["time/trainer_wait_s"] for r in rows) > 0.3  # the slow reward is what the trainer waits for


def test_async_applies_the_mismatch_budget_and_the_auto_choice(tmp_path):
    """The budget and `--objective auto` act in the async loop as in the sync one: a lag of 2 makes
    pi_old / mu drift, the KL budget fires and lowers the learning rate, and auto logs its choice."""
    run = tmp_path / "auto"
    async_loop.train(TrainConfig.from_flat(**SMALL, steps=3, out=str(run), objective="auto", mode=TrainMode.ASYNC,
                                 max_staleness=2, budget_max_kl=1e-12, budget_action="lower_lr"))
    rows = _metrics(run)
    assert all(r["auto/level"] in ("token", "sequence", "geometric") for r in rows)
    stale = [r for r in rows if r["meter/version/age_max"] > 0]
    assert stale and all(r["budget/alarms"] >= 1 for r in stale)
    assert rows[-1]["budget/lr_scale"] < 1 and rows[-1]["lr"] < SMALL["lr"]
