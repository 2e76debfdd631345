"""Several weighted rewards, TRL-convention rewards called once per batch, async rewards, fail fast.

The rewards are in tests/unit/_batched_rewards.py; workers import them by name (tests/unit is on the path).
"""

import argparse
import json
import math
from pathlib import Path

import pytest

from tether.configs import add_dataclass_arguments, config_from_args
from tether.tasks.base import Example
from tether.tasks.jsonl import JsonlTask
from tether.tasks.reward_pool import RewardCall, RewardPool
from tether.tasks.rewards import numeric, split_weight
from tether.train import setup
from tether.train.config import TrainConfig
from tether.train.scoring import Scorer
from tether.train.sync import TrainingStopped

pytestmark = pytest.mark.unit
HERE = Path(__file__).resolve().parent


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)}) for a in range(50)) + "\n")
    return str(path)


def scorer(data, rewards, counters=None, **cfg) -> Scorer:
    config = TrainConfig(prompts_per_step=2, group_size=2, reward=rewards, **cfg)
    return Scorer(JsonlTask(data, reward=config.rewards[0][0]), config, {} if counters is None else counters)


# ---------------------------------------------------------------------------------------------- NAME[:WEIGHT]

@pytest.mark.parametrize("text, spec, weight", [
    ("numeric", "numeric", 1.0), ("numeric:0.5", "numeric", 0.5), ("my_rewards:score", "my_rewards:score", 1.0),
    ("my_rewards:score:-2", "my_rewards:score", -2.0), ("pkg.mod:Judge.score:1e-1", "pkg.mod:Judge.score", 0.1),
    ("/abs/rewards.py:fn:3", "/abs/rewards.py:fn", 3.0), ("exact_match:0", "exact_match", 0.0),
])
def test_a_weight_is_a_trailing_number_after_a_complete_reward_name(text, spec, weight):
    assert split_weight(text) == (spec, weight)


@pytest.mark.parametrize("text, message", [
    ("my_rewards:0.5", "ambiguous: 'my_rewards' is not a built-in"),
    ("my_rewards:score:inf", "the weight must be a finite number"),
    ("my_rewards:score:x-1", "'x-1' is neither a function name nor a weight"),
    ("numeric:nan", "the weight must be a finite number"),
])
def test_an_ambiguous_name_or_a_bad_weight_is_one_error_naming_the_field(text, message):
    with pytest.raises(ValueError, match="config field 'reward'") as e:
        TrainConfig.from_flat(reward=["exact_match", text])
    assert message in str(e.value)
    with pytest.raises(ValueError, match="names 'numeric' twice"):
        TrainConfig.from_flat(reward=["numeric", "numeric:2"])


def test_reward_is_repeatable_on_the_command_line_and_a_list_in_a_file(tmp_path):
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, TrainConfig)
    cfg = config_from_args(TrainConfig, parser.parse_args(["--reward", "exact_match:2", "--reward", "m:f:0.5"]))
    assert cfg.rewards == [("exact_match", 2.0), ("m:f", 0.5)]
    path = tmp_path / "c.toml"
    path.write_text('reward = ["numeric:0.25", "exact_match"]\n')
    assert config_from_args(TrainConfig, parser.parse_args(["--config", str(path)])).rewards == [
        ("numeric", 0.25), ("exact_match", 1.0)]
    flags = parser.parse_args(["--config", str(path), "--reward", "exact_match"])  # flags replace the file's list
    assert config_from_args(TrainConfig, flags).rewards == [("exact_match", 1.0)]
    assert TrainConfig.from_flat(reward="numeric:3").rewards == [("numeric", 3.0)]  # one string: a list of one


# ------------------------------------------------------------------------------------------- the weighted sum

def test_the_sample_reward_is_the_weighted_sum_with_failed_rewards_as_zero(data):
    """R_i = sum_k w_k r_ik, a failed r_ik (here: None from a TRL reward) counting 0, checked by a loop."""
    rewards = ["exact_match:2", "numeric:-0.5", "_batched_rewards:half_none:0.25"]
    examples = [Example(f"{a}+{a}=", str(2 * a)) for a in range(4)]
    texts = ["0", "x 2", "4.0", "nope"]
    with scorer(data, rewards, reward_workers=0) as s:
        scored = s.score_batch(examples, texts)
        metrics = setup.reward_metrics(s, scored)
    em = [1.0 if t.split("\n")[0].strip() == ex.answer else 0.0 for ex, t in zip(examples, texts)]
    num = [numeric(ex.prompt, t, ex.answer) for ex, t in zip(examples, texts)]
    half = [2.0 if i % 2 == 0 else None for i in range(4)]
    want = []
    for i in range(4):
        total = 2 * em[i] - 0.5 * num[i]
        if half[i] is not None:
            total += 0.25 * half[i]
        want.append(total)
    assert [r.reward for r in scored.results] == pytest.approx(want, abs=1e-12)
    assert not any(r.failed for r in scored.results)  # a sample fails only when every reward failed on it
    assert scored.failed_calls == 2
    assert metrics["reward/exact_match/mean"] == pytest.approx(sum(em) / 4)
    assert metrics["reward/numeric/std"] == pytest.approx(math.sqrt(sum((v - sum(num) / 4) ** 2 for v in num) / 4))
    assert metrics["reward/half_none/mean"] == 2.0 and metrics["reward/half_none/std"] == 0.0
    assert metrics["reward/half_none/failed"] == 2.0 and metrics["reward/exact_match/failed"] == 0.0


def test_failures_are_counted_per_reward(data):
    counters = {}
    with scorer(data, ["exact_match", "_batched_rewards:half_none"], counters, reward_workers=0) as s:
        scored = s.score_batch([Example("1+1=", "2")] * 4, ["2"] * 4)
        s.record(scored.failed_calls, 4, 0, setup.failed_by_reward(s, scored))
    assert counters["reward_failed"] == 2
    assert counters["reward_failed/_batched_rewards:half_none"] == 2
    assert counters["reward_failed/exact_match"] == 0


# ------------------------------------------------------------------------------------------- TRL convention

@pytest.mark.parametrize("workers", [0, None])  # in the trainer's process, in a worker process
def test_a_trl_reward_is_called_once_per_batch_with_trls_keywords(data, tmp_path, monkeypatch, workers):
    log = tmp_path / "batch.log"
    monkeypatch.setenv("BATCH_LOG", str(log))
    examples = [Example(f"{a}+{a}=", str(2 * a)) for a in range(6)]
    with scorer(data, ["_batched_rewards:batched", "_batched_rewards:names_state"], reward_workers=workers,
                steps=7) as s:
        scored = s.score_batch(examples, ["0", "2", "no", "6", "8", "1"], [[1, 2]] * 6, step=3)
        metrics = setup.reward_metrics(s, scored)
    assert [json.loads(x) for x in log.read_text().splitlines()] == [
        {"n": 6, "step": 3, "max_steps": 7, "ids": True, "prompts": 6}]
    assert scored.values_K[0] == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    assert scored.values_K[1] == [3.0] * 6  # names trainer_state only (no **kwargs): given just that
    assert metrics["reward/batched/batch_size"] == 6.0  # log_metric, in the step's row


def test_a_timed_out_batched_call_fails_the_batch_for_that_reward():
    pool = RewardPool("_batched_rewards:sleepy", workers=1, timeout_s=0.5, trl_convention=True)
    try:
        first = pool.pids
        results, logged = pool.call_batch([RewardCall("p", "c", "a", fields={})] * 3, {"global_step": 0,
                                                                                       "max_steps": 1})
        assert [r.kind for r in results] == ["timeout"] * 3 and logged == {}
        assert pool.stats["timeouts"] == 1 and pool.stats["failed"] == 3 and pool.pids != first
    finally:
        pool.close()


@pytest.mark.parametrize("workers", [0, None])
def test_async_rewards_are_awaited_concurrently(data, tmp_path, monkeypatch, workers):
    """Each call of async_a waits for the same call of async_b and the other way round (3 s at most):
    both score 1.0 only if they run at the same time; one after the other, both would fail."""
    monkeypatch.setenv("RENDEZVOUS", str(tmp_path))
    monkeypatch.setattr("_batched_rewards._calls", {"a": 0, "b": 0})
    with scorer(data, ["_batched_rewards:async_a", "_batched_rewards:async_b"], reward_workers=workers) as s:
        for _ in range(2):
            scored = s.score_batch([Example("1+1=", "2")] * 3, ["2"] * 3)
            assert scored.values_K == [[1.0] * 3, [1.0] * 3]


# ------------------------------------------------------------------------------------------------ fail fast

@pytest.mark.parametrize("workers", [0, None])
def test_a_reward_failing_on_every_sample_of_the_first_step_stops_with_its_traceback(data, workers):
    with scorer(data, ["exact_match", "_batched_rewards:broken"], reward_workers=workers) as s:
        scored = s.score_batch([Example("1+1=", "2")] * 4, ["2"] * 4)
        with pytest.raises(TrainingStopped) as stop:
            s.record(scored.failed_calls, 4, 0, setup.failed_by_reward(s, scored))
    text = str(stop.value)
    assert text.startswith("reward '_batched_rewards:broken' failed on every sample of the first step (step 0, 4 of 4)")
    line = next(i for i, x in enumerate((HERE / "_batched_rewards.py").read_text().splitlines(), 1)
                if "return digits[completion]" in x)
    assert f'_batched_rewards.py", line {line}, in broken' in text
    assert "KeyError: '2'" in text and "tether/" not in text.split("traceback", 1)[1]  # the user's frames only
    assert text.count("Traceback (most recent call last)") == 1


def test_a_later_all_failed_step_follows_max_failed_reward_steps(data):
    with scorer(data, ["_batched_rewards:broken"], reward_workers=0, max_failed_reward_steps=2) as s:
        s.record(3, 4, 0)  # the first step scored a sample: no fail fast
        s.record(4, 4, 1)
        with pytest.raises(TrainingStopped, match=r"every reward call failed in 2 consecutive steps \(steps 1-2\)"):
            s.record(4, 4, 2)
