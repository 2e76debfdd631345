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
