"""`tether train --env` with the step algorithms of issue 15: StepPO (``--objective steppo``) and Fission-GRPO
(``--fission G'``), two steps each on a built-in environment, through the command line in-process."""

from __future__ import annotations

import json

import pytest

from tether.cli import main

pytestmark = pytest.mark.e2e
SMALL = ["--prompts-per-step", "2", "--group-size", "3", "--max-new-tokens", "3", "--warmstart-steps", "5",
         "--eval-size", "4", "--threads", "1", "--no-progress", "--quiet", "--steps", "2"]


def _train(tmp_path, name, *flags):
    out = tmp_path / name
    assert main(["train", *SMALL, "--out", str(out), *flags]) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_steppo_trains_one_term_per_turn_on_frozenlake(tmp_path):
    rows = _train(tmp_path, "steppo", "--env", "frozenlake", "--objective", "steppo", "--max-turns", "3")
    assert len(rows) == 2
    for r in rows:
        # the ratio is per turn: as many step terms as turns played, more than one per episode (step_BT reached it)
        assert r["steppo/steps"] == pytest.approx(r["agent/turns_mean"] * 6)
        assert r["steppo/steps"] > 6 and r["loss"] == r["loss"]


def test_fission_adds_forked_groups_on_calculator(tmp_path):
    rows = _train(tmp_path, "fission", "--env", "calculator", "--fission", "2", "--max-new-tokens", "6")
    assert len(rows) == 2
    # one failed episode forked per group that has one (2 groups of 3), 2 continuations each
    assert all(r["agent/fission_rows"] in (0, 2, 4) for r in rows) and sum(r["agent/fission_rows"] for r in rows) > 0
    for r in rows:
        assert 0 <= r["agent/fission_success_rate"] <= 1
        assert r["agent/mismatch/policy/n_tokens"] > 0 and r["loss"] == r["loss"]


def test_fission_is_validated_at_the_edge(capsys):
    assert main(["train", "--env", "calculator", "--fission", "1", "--steps", "1"]) == 2
    assert "config field 'fission' must be >= 2" in capsys.readouterr().err
    from tether.train.config import TrainConfig

    with pytest.raises(ValueError, match="'fission'"):
        TrainConfig.from_flat(env="calculator", fission=0)
    with pytest.raises(ValueError, match="fission"):  # an agent setting: refused without --env
        TrainConfig.from_flat(fission=2)
    for algorithm in ("dagger", "bepa"):  # a fork's replayed prefix would mix with teacher labels / cached episodes
        with pytest.raises(ValueError, match="config field 'fission' forks the sampled episodes of algorithm 'rl'"):
            TrainConfig.from_flat(env="calculator", fission=2, algorithm=algorithm)
