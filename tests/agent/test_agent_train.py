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
             progress=False, threads=1, plots=False)


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
    assert all("agent/success_rate" in r for r in rows)  # the episodes reach the step (turn credit, agent metrics)
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
    r = rows[0]
    assert r["advantage/std"] > 0 and abs(r["advantage/mean"]) < 10 and r["loss"] == r["loss"]


def _weights(tmp_path, name, step):
    return load_checkpoint_dir(tmp_path / name / "checkpoints" / f"step_{step:06d}").state["model"]


def _same_weights(a, b) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


# Step 1's episodes come from the same warm start and seeds in every run below, so the first logged row's
# advantage statistics (of each episode's first-turn advantage) differ only by the credit settings.

def test_credit_baseline_reaches_the_estimator(tmp_path):
    rows, weights = {}, {}
    for b in (None, "std", "mean", "loo"):
        name = f"b-{b}"
        _, got = _train(tmp_path, name, credit="turn", credit_baseline=b, steps=1, drift_every=0)
        rows[b], weights[b] = got[0], _weights(tmp_path, name, 1)
    assert rows[None]["advantage/std"] == rows["std"]["advantage/std"]  # none: turn's default, std
    assert _same_weights(weights[None], weights["std"])
    # turn 0's cell is the whole group (4 episodes): A_loo = A_mean * 4/3 exactly; both centred (mean 0)
    assert rows["loo"]["advantage/std"] == pytest.approx(rows["mean"]["advantage/std"] * 4 / 3, rel=1e-5)
    assert abs(rows["mean"]["advantage/mean"]) < 1e-6 and abs(rows["loo"]["advantage/mean"]) < 1e-6
    assert rows["mean"]["advantage/std"] > 0
    assert rows["std"]["advantage/std"] != pytest.approx(rows["mean"]["advantage/std"], rel=1e-3)
    assert not _same_weights(weights["std"], weights["mean"]) and not _same_weights(weights["mean"], weights["loo"])


def test_credit_baseline_is_validated():
    with pytest.raises(ValueError, match="credit_baseline.*one of std, mean, loo"):
        TrainConfig.from_flat(env=ENV, credit="turn", credit_baseline="median")
    with pytest.raises(ValueError, match="credit_baseline.*--advantage"):
        TrainConfig.from_flat(env=ENV, credit_baseline="loo")  # credit episode: the preset's estimator
    from tether.agent.credit import BASELINES
    from tether.train.config import CREDIT_BASELINES

    assert CREDIT_BASELINES == BASELINES


def test_gamma_changes_the_turn_credit(tmp_path):
    # Copy pays 0.5 per right letter: G_0 = r_0 + gamma r_1, so gamma reweights turn 0's return
    rows, weights = {}, {}
    for g in (1.0, 0.5):
        name = f"g-{g}"
        _, got = _train(tmp_path, name, credit="turn", credit_baseline="mean", gamma=g, steps=1, drift_every=0)
        rows[g], weights[g] = got[0], _weights(tmp_path, name, 1)
    assert rows[1.0]["advantage/std"] > 0
    assert rows[1.0]["advantage/std"] != pytest.approx(rows[0.5]["advantage/std"], rel=1e-3)
    assert not _same_weights(weights[1.0], weights[0.5])


def test_gigpo_omega_changes_the_credit_and_zero_is_episode_grpo(tmp_path):
    rows, weights = {}, {}
    for name, kw in {"w0": dict(credit="gigpo", gigpo_omega=0.0), "w1": dict(credit="gigpo", gigpo_omega=1.0),
                     "episode": dict(credit="episode")}.items():
        _, got = _train(tmp_path, name, steps=1, drift_every=0, **kw)
        rows[name], weights[name] = got[0], _weights(tmp_path, name, 1)
    # omega 0 leaves GiGPO's episode term: the grpo advantage of the returns, as credit 'episode' with grpo
    assert rows["w0"]["advantage/std"] == pytest.approx(rows["episode"]["advantage/std"], rel=1e-5)
    # every group's first turns share the reset observation's anchor, so omega adds a step term on turn 0
    assert rows["w1"]["advantage/std"] > rows["w0"]["advantage/std"] * 1.01
    assert not _same_weights(weights["w0"], weights["w1"])
