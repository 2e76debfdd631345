"""`tether train --env` with DART's switches (tether.agent.dart): each through the command line in-process, a few
steps on a built-in environment, and each refused at the edge where it cannot apply."""

from __future__ import annotations

import json
import math

import pytest

from tether.cli import main

pytestmark = pytest.mark.e2e
SMALL = ["--prompts-per-step", "2", "--group-size", "3", "--max-new-tokens", "3", "--warmstart-steps", "5",
         "--eval-size", "2", "--threads", "1", "--no-progress", "--quiet", "--max-turns", "3", "--drift-every", "0"]

COPY = "tests.agent.toy_envs:Copy"


def _train(tmp_path, name, *flags):
    out = tmp_path / name
    assert main(["train", *SMALL, "--out", str(out), *flags]) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_entropy_selection_trains_on_the_top_steps(tmp_path):
    # Copy after a 15-step warm start succeeds about half the time, so the advantages are not all 0
    one = ("--env", COPY, "--steps", "1", "--warmstart-steps", "15")
    off = _train(tmp_path, "off", *one)[0]
    full = _train(tmp_path, "full", *one, "--dart-entropy-top", "1.0")[0]
    half = _train(tmp_path, "half", *one, "--dart-entropy-top", "0.5")[0]
    # the same sampled step: keeping every step is the plain update, keeping half changes what the update reads
    assert full["loss"] == off["loss"] and full["dart/kept_token_frac"] == 1.0 and "dart/steps" not in off
    assert half["loss"] != off["loss"]
    assert half["dart/steps"] == pytest.approx(half["agent/turns_mean"] * 6)  # every played turn is a candidate
    assert half["dart/kept_steps"] == math.ceil(half["dart/steps"] * 0.5)
    assert 0 < half["dart/kept_token_frac"] < 1 and half["dart/kept_entropy_mean"] >= half["dart/dropped_entropy_mean"]


def test_adaptive_counts_and_reuse_on_a_repeating_task_pool(tmp_path):
    # Copy with a 15-step warm start succeeds about half the time; a pool of 3 seeds makes the tasks repeat
    flags = ("--env", COPY, "--warmstart-steps", "15", "--task-pool", "3", "--dart-adaptive", "--dart-min-rollouts",
             "1", "--dart-max-rollouts", "5", "--dart-reuse", "--checkpoint-every", "2")
    rows = _train(tmp_path, "adaptive", *flags, "--steps", "4")
    assert len(rows) == 4
    for r in rows:
        assert 1 <= r["dart/rollouts_min"] <= 3 <= r["dart/rollouts_max"] <= 5  # the total stays 2 * 3
        assert 0 < r["dart/tasks_tracked"] <= 3 and r["dart/reuse_cache_size"] <= 3
        # a replayed success is 2 turns of (letter, EOS) cache tokens in the loss, metered apart from the policy's
        assert r.get("agent/mismatch/cache/n_tokens", 0) == 4 * r["dart/reuse_injected"]
        assert r["agent/success_rate"] >= r["dart/reuse_sampled_success_rate"]
    assert rows[0]["dart/rollouts_min"] == rows[0]["dart/rollouts_max"] == 3  # no history yet: uniform
    assert any(r["dart/rollouts_min"] < r["dart/rollouts_max"] for r in rows)  # the history moved the counts
    assert sum(r["dart/reuse_injected"] for r in rows) > 0  # a stored success came back into an all-fail group
    # a resume carries the success history and the cache: steps 3-4 allocate and replay as without the stop
    _train(tmp_path, "part", *flags, "--steps", "2")
    assert main(["train", *SMALL, *flags, "--steps", "4", "--resume", str(tmp_path / "part")]) == 0
    resumed = [json.loads(line) for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    keys = ("dart/rollouts_min", "dart/rollouts_max", "dart/tasks_tracked", "dart/reuse_injected", "loss")
    assert [[r[k] for k in keys] for r in resumed[-2:]] == [[r[k] for k in keys] for r in rows[2:]]


def test_dart_switches_are_validated_at_the_edge(capsys):
    from tether.train.config import TrainConfig

    assert main(["train", "--env", "frozenlake", "--dart-entropy-top", "1.5", "--steps", "1"]) == 2
    assert "config field 'dart_entropy_top' must be in (0, 1]" in capsys.readouterr().err
    with pytest.raises(ValueError, match="dart_entropy_top"):  # an agent setting: refused without --env
        TrainConfig.from_flat(dart_entropy_top=0.5)
    with pytest.raises(ValueError, match="'dart_entropy_top' needs the trainer's entropy"):
        TrainConfig.from_flat(env="frozenlake", dart_entropy_top=0.5, mode="async", old_logits="loglinear")
    with pytest.raises(ValueError, match="'dart_adaptive' needs mode 'sync'"):
        TrainConfig.from_flat(env="frozenlake", dart_adaptive=True, mode="async")
    with pytest.raises(ValueError, match="must bracket group_size"):
        TrainConfig.from_flat(env="frozenlake", dart_adaptive=True, group_size=4, dart_max_rollouts=3)
    with pytest.raises(ValueError, match="'dart_reuse' is algorithm 'rl'"):
        TrainConfig.from_flat(env="frozenlake", dart_reuse=True, algorithm="bepa")
    with pytest.raises(ValueError, match="'dart_reuse' excludes fission"):
        TrainConfig.from_flat(env="frozenlake", dart_reuse=True, fission=2)
    with pytest.raises(ValueError, match="'task_pool'"):
        TrainConfig.from_flat(env="frozenlake", task_pool=0)
