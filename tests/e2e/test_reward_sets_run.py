"""Several weighted rewards in a real `tether train` run: per-reward metrics, a TRL reward called once per
step on the whole batch, and the fail-fast stop of a reward that never works (its traceback, once).

The rewards are tests/unit/_batched_rewards.py, given by file path; ``batched`` logs one line per call to
$BATCH_LOG, so the tests know each call's batch size and the step it was told.
"""

import json
from pathlib import Path

import pytest

from tests.processes import run as run_child
from tests.processes import tether_command, tether_env

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
REWARDS = ROOT / "tests" / "unit" / "_batched_rewards.py"
TINY = ["--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "6", "--warmstart-steps", "30",
        "--eval-size", "10", "--threads", "2", "--no-progress", "--no-plots", "--classic"]  # scored in the trainer's thread


def train(tmp_path: Path, *flags: str, config: str | None = None):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)}) for a in range(200)) + "\n")
    extra = []
    if config is not None:
        (tmp_path / "run.toml").write_text(config)
        extra = ["--config", str(tmp_path / "run.toml")]
    return run_child(tether_command("train", "--task", str(data), "--out", str(tmp_path / "run"), *TINY, *extra,
                                    *flags), env=tether_env(BATCH_LOG=str(tmp_path / "batch.log")))


def test_two_weighted_rewards_a_batched_call_per_step_and_per_reward_metrics(tmp_path):
    r = train(tmp_path, "--steps", "2", "--reward", "exact_match:1", "--reward", f"{REWARDS}:batched:0.5")
    assert r.returncode == 0, r.stdout + r.stderr
    calls = [json.loads(x) for x in (tmp_path / "batch.log").read_text().splitlines()]
    # evaluation before, steps 0 and 1 (the whole batch of 4 x 4, once each), evaluation after
    assert [(c["n"], c["step"]) for c in calls] == [(10, 0), (16, 0), (16, 1), (10, 2)]
    assert all(c["ids"] and c["max_steps"] == 2 for c in calls)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1]
    for row in rows:
        assert row["reward/exact_match/failed"] == 0 and row["reward/batched/failed"] == 0
        assert row["reward/batched/batch_size"] == 16  # logged by the reward with log_metric
        assert row["reward/mean"] == pytest.approx(row["reward/exact_match/mean"] + 0.5 * row["reward/batched/mean"],
                                                   abs=1e-6)
        assert row["reward/batched/std"] >= 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["count/reward_failed/exact_match"] == 0 and summary[f"count/reward_failed/{REWARDS}:batched"] == 0


def test_a_reward_that_fails_on_every_sample_of_the_first_step_stops_with_its_traceback_once(tmp_path):
    r = train(tmp_path, "--steps", "5", config=f'reward = ["exact_match", "{REWARDS}:broken:2"]\n')
    out = r.stdout + r.stderr
    assert r.returncode == 3, out
    assert (f"tether train: stopped: reward '{REWARDS}:broken' failed on every sample of the first step (step 0, "
            "16 of 16), first error: exception: KeyError:") in r.stdout
    line = next(i for i, x in enumerate(REWARDS.read_text().splitlines(), 1) if "return digits[completion]" in x)
    assert out.count(f'_batched_rewards.py", line {line}, in broken') == 1
    assert out.count("Traceback (most recent call last)") == 1
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not metrics.exists() or metrics.read_text() == ""  # nothing was trained on


def test_after_a_first_step_that_scores_the_max_failed_reward_steps_rule_applies(tmp_path):
    r = train(tmp_path, "--steps", "6", "--reward", f"{REWARDS}:too_large_from_step_1",
              "--max-failed-reward-steps", "2")
    assert r.returncode == 3, r.stdout + r.stderr
    assert (f"stopped: every reward call failed in 2 consecutive steps (steps 1-2): reward "
            f"'{REWARDS}:too_large_from_step_1', last error: out of range: returned 1e+39") in r.stdout
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1]
    assert [row["reward/too_large_from_step_1/failed"] for row in rows] == [0, 16]
