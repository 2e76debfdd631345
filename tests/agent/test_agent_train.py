"""`tether train --env`: episodes through the shared run, both drivers, resume, and every agent setting."""

from __future__ import annotations

import json

import pytest
import torch

from tether.train.checkpoint import load_checkpoint_dir
from tether.train.config import TrainConfig

pytestmark = pytest.mark.e2e
ENV = "tests.agent.toy_envs:Copy"
SMALL = dict(env=ENV, prompts_per_step=4, group_size=4, max_new_tokens=3, warmstart_steps=5, eval_size=8,
             progress=False, threads=1)


def _train(tmp_path, name="run", **kw):
    cfg = TrainConfig.from_flat(**{**SMALL, "steps": 2, "out": str(tmp_path / name), **kw})
    if cfg.mode.value == "async":
        from tether.train.async_loop import train
    else:
        from tether.train.sync import train
    summary = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return summary, rows


def test_sync_run_logs_episodes_and_evaluates_success(tmp_path):
    summary, rows = _train(tmp_path)
    assert summary["task"] == f"env {ENV}"
    assert 0 <= summary["eval/accuracy_before"] <= 1 and len(rows) == 2
    for r in rows:
        assert r["agent/turns_mean"] <= 2 and r["agent/outcome_done_frac"] + r["agent/outcome_budget_frac"] == 1
        assert r["agent/tokens_tool_frac"] > 0 and r["agent/tokens_env_frac"] == 0  # Copy's reply is a tool's
        assert r["reward/mean"] == pytest.approx(r["agent/return_mean"])
        assert r["mismatch/abs_logp_diff_max"] < 1e-4  # engine and trainer agree on every policy token


def test_turn_cap_budget_and_env_options_reach_the_episode(tmp_path):
    _, rows = _train(tmp_path, "cap", max_turns=1)
    assert all(r["agent/turns_mean"] == 1 and r["agent/outcome_max_turns_frac"] == 1 for r in rows)
    _, rows = _train(tmp_path, "budget", max_episode_tokens=10)  # "say a\n" + 3 tokens fits; the reply does not
    assert all(r["agent/outcome_budget_frac"] == 1 for r in rows)
    with pytest.raises(ValueError, match="env_options"):
        _train(tmp_path, "opts", env_options={"colour": "red"})
    _, rows = _train(tmp_path, "opts2", env_options={"letters": "z"})
    assert rows  # the constructor took it (the warm start then only ever sees 'z')


def test_async_episode_versions_never_decrease_along_a_row(tmp_path):
    from tether.agent.loop import Episodes

    seen = []
    orig = Episodes.collect

    def spy(self, *a, **k):
        out = orig(self, *a, **k)
        seen.append(out.rollout)
        return out

    Episodes.collect = spy
    try:
        _, rows = _train(tmp_path, "async", mode="async", max_staleness=2, partial_chunk_tokens=1, steps=4)
    finally:
        Episodes.collect = orig
    assert len(rows) == 4
    grew = False
    for r in seen[1:]:  # the first collect is the evaluation
        v = r.version_BT
        for b in range(r.batch_size):
            vs = v[b][r.loss_mask_BT[b]]
            assert (vs[1:] >= vs[:-1]).all()
            grew |= bool(vs.max() > vs.min())
    assert grew  # some episode spans two weight versions


def test_resumed_env_run_equals_uninterrupted(tmp_path):
    _train(tmp_path, "full", steps=4, checkpoint_every=2)
    _train(tmp_path, "part", steps=2, checkpoint_every=2)
    cfg = TrainConfig.from_flat(**{**SMALL, "steps": 4, "checkpoint_every": 2, "resume": str(tmp_path / "part")})
    from tether.train.sync import train

    train(cfg)
    a = load_checkpoint_dir(tmp_path / "full" / "checkpoints" / "step_000004").state["model"]
    b = load_checkpoint_dir(tmp_path / "part" / "checkpoints" / "step_000004").state["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_single_turn_settings_that_do_not_apply_are_refused():
    with pytest.raises(ValueError, match="overlong_buffer"):
        TrainConfig.from_flat(env=ENV, overlong_buffer=2)
    with pytest.raises(ValueError, match="drop"):
        TrainConfig.from_flat(env=ENV, mode="async", staleness_policy="drop")
    with pytest.raises(ValueError, match="needs env"):
        TrainConfig.from_flat(max_turns=3)
    with pytest.raises(ValueError, match="agent algorithms"):
        from tether.train.sync import train

        train(TrainConfig.from_flat(**{**SMALL, "objective": "calibrl", "steps": 1}))


@pytest.mark.parametrize("credit", ["turn", "turn_unbiased", "gigpo", "discounted"])
def test_every_credit_trains_with_gamma_and_omega(tmp_path, credit):
    _, rows = _train(tmp_path, credit, credit=credit, gamma=0.9, gigpo_omega=0.5, steps=1, drift_every=0)
    assert rows and "agent/retokenize_mismatch_frac" not in rows[0]  # drift_every 0: never measured
    assert all(abs(r["adv/mean"]) < 10 for r in rows) if "adv/mean" in rows[0] else rows
