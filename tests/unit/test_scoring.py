"""The run's scorer: where each reward runs, failures counted under the reward's name, the stop rule."""

import json
import logging

import pytest

from tether.tasks.arithmetic import ArithmeticTask
from tether.tasks.base import Example
from tether.tasks.jsonl import JsonlTask
from tether.tasks.reward_pool import default_workers
from tether.tasks.trl_data import TRLDatasetTask
from tether.train.config import TrainConfig
from tether.train.scoring import Scorer
from tether.train.sync import TrainingStopped

pytestmark = pytest.mark.unit
BATCH = dict(prompts_per_step=2, group_size=2)


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)}) for a in range(50)) + "\n")
    return str(path)


def scorer(task, counters=None, **cfg) -> Scorer:
    return Scorer(task, TrainConfig(**{**BATCH, **cfg}), {} if counters is None else counters)


def test_builtin_rewards_run_in_process_and_user_rewards_in_workers(data):
    with scorer(ArithmeticTask()) as s:
        assert s.pool is None
    with scorer(ArithmeticTask(), reward_workers=1) as s:  # asked for: even a built-in goes to a worker
        assert len(s.pool.pids) == 1
        assert [r.reward for r in s.score([Example("1+1=", "2")] * 2, ["2", "3"])] == [1.0, 0.0]
    with scorer(JsonlTask(data, reward="exact_match")) as s:
        assert s.pool is None
    with scorer(JsonlTask(data, reward="_hostile_rewards:exact")) as s:
        assert len(s.pool.pids) == default_workers(4)
    with scorer(JsonlTask(data, reward="_hostile_rewards:exact"), reward_workers=0) as s:
        assert s.pool is None


def test_a_reward_no_worker_can_import_runs_in_process_with_a_warning(caplog):
    rows = [{"prompt": f"q{i}", "answer": "a"} for i in range(30)]
    task = TRLDatasetTask(rows, reward=lambda prompt, completion, answer: 1.0, eval_fraction=0)
    with caplog.at_level(logging.WARNING, logger="tether.train.scoring"), scorer(task) as s:
        assert s.pool is None
        assert [r.reward for r in s.score([Example("q0", "a")], ["x"])] == [1.0]
    assert "cannot be imported by name in a worker process" in caplog.text


def test_failures_count_under_the_rewards_name_and_in_evaluation(data, caplog):
    counters = {"reward_failed": 5}
    with scorer(JsonlTask(data, reward="_hostile_rewards:bad_value"), counters) as s:
        results = s.score([Example("p", "a")] * 3, ["nan", "fine", "too_large"])
        assert [r.failed for r in results] == [True, False, True]
        s.record(2, 3, step=0)
        s.score_eval([Example("p", "a")] * 2, ["inf", "fine"])
    assert counters == {"reward_failed": 7, "reward_failed/_hostile_rewards:bad_value": 2, "eval_reward_failed": 1}
    assert "reward '_hostile_rewards:bad_value' failed (non-finite: returned nan)" in caplog.text


def test_every_reward_failing_for_k_steps_stops_with_the_reward_and_its_error(data):
    with scorer(JsonlTask(data, reward="_hostile_rewards:bad_value"), max_failed_reward_steps=3) as s:
        s.score([Example("p", "a")], ["too_large"])
        s.record(3, 4, step=0)  # the first step scored a sample (an all-failed first step stops at once)
        s.record(4, 4, step=1)
        s.record(4, 4, step=2)
        s.record(3, 4, step=3)  # one sample scored: the streak starts again
        s.record(4, 4, step=4)
        s.record(4, 4, step=5)
        s.record(0, 0, step=5)  # an empty batch (a refill of no groups) changes nothing
        with pytest.raises(TrainingStopped) as stop:
            s.record(4, 4, step=6)
    assert str(stop.value).startswith(
        "every reward call failed in 3 consecutive steps (steps 4-6): reward '_hostile_rewards:bad_value', "
        "last error: out of range: returned 1e+39")


def test_a_refill_that_scores_saves_its_step(data):
    with scorer(JsonlTask(data, reward="_hostile_rewards:exact"), max_failed_reward_steps=3, reward_workers=0) as s:
        s.record(3, 4, step=0)
        s.record(4, 4, step=1)
        s.record(1, 2, step=1)  # the async refill of step 1 scored one sample: step 1 is not all-failed
        s.record(4, 4, step=2)
        s.record(4, 4, step=3)
        with pytest.raises(TrainingStopped, match=r"\(steps 2-4\)"):
            s.record(4, 4, step=4)


def test_a_reward_that_cannot_run_at_all_stops_the_run(data, tmp_path, monkeypatch):
    """The trainer imported the reward; a worker cannot (here: the module vanished in between)."""
    module = tmp_path / "vanishing_reward.py"
    module.write_text("def fn(prompt, completion, answer):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    task = JsonlTask(data, reward="vanishing_reward:fn")
    module.unlink()
    with scorer(task) as s, pytest.raises(TrainingStopped, match="'vanishing_reward:fn': a worker process could "
                                                                 "not import it: RewardLoadError"):
        s.score([Example("p", "a")], ["x"])


def test_reward_workers_and_the_stop_rule_are_validated():
    with pytest.raises(ValueError, match="'reward_workers' must be >= 0"):
        TrainConfig(reward_workers=-1)
    with pytest.raises(ValueError, match="'max_failed_reward_steps' must be >= 1"):
        TrainConfig(max_failed_reward_steps=0)
