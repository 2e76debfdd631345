"""Hostile rewards in a real `tether train` run: a hang or a crash costs one sample, never the run.

Each run is the CLI on a small JSONL task with a reward from tests/unit/_hostile_rewards.py given by
file path. That module logs one line per call (``hang <pid>`` / ``ok <pid>``) to $HOSTILE_LOG, so the
tests know exactly how many calls misbehaved and which worker processes must be gone afterwards.
Counts are asserted, not durations.
"""

import json
import time
from pathlib import Path

import pytest

from tests.processes import run as run_child
from tests.processes import tether_command, tether_env

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
HOSTILE = ROOT / "tests" / "unit" / "_hostile_rewards.py"
TINY = ["--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "6", "--warmstart-steps", "30",
        "--eval-size", "10", "--threads", "2", "--no-progress", "--no-plots", "--checkpoint-every", "1", "--classic"]


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def train(tmp_path: Path, reward: str, *flags: str, env: dict | None = None):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)}) for a in range(200)) + "\n")
    log = tmp_path / "calls.log"
    # the reward's workers run in sessions of their own: killing the trainer's group on exit leaves them alone,
    # so the check below still sees whether the pool stopped them
    r = run_child(tether_command("train", "--task", str(data), "--reward", f"{HOSTILE}:{reward}",
                                 "--out", str(tmp_path / "run"), *TINY, *flags),
                  env=tether_env(HOSTILE_LOG=str(log), **(env or {})))
    calls = [line.split() for line in log.read_text().splitlines()] if log.exists() else []
    deadline = time.monotonic() + 30
    pids = {int(pid) for _, pid in calls}
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    assert [p for p in pids if alive(p)] == [], "reward worker processes outlived the run"
    return r, [event for event, _ in calls]


def counted(tmp_path: Path, reward: str) -> tuple[int, int, dict]:
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    name = f"count/reward_failed/{HOSTILE}:{reward}"
    assert summary[name] == summary["count/reward_failed"]  # counted under the user's function, not a wrapper
    return summary[name], summary["count/eval_reward_failed"], summary


def test_a_reward_that_hangs_one_call_in_five_costs_one_sample_per_hang(tmp_path):
    r, events = train(tmp_path, "sleep_one_in_five", "--steps", "3", "--reward-timeout-s", "0.5")
    assert r.returncode == 0, r.stdout + r.stderr
    train_failed, eval_failed, summary = counted(tmp_path, "sleep_one_in_five")
    hangs = events.count("hang")
    assert hangs >= 9  # more than the 8 abandoned threads the old thread timeout allowed before giving up
    assert train_failed + eval_failed == hangs
    assert train_failed > 0 and eval_failed > 0
    assert summary["steps"] == 3


def test_a_reward_holding_the_gil_is_killed_at_its_timeout(tmp_path):
    """Regex backtracking in C holds the GIL for 2^28 steps (tens of seconds); a thread timeout cannot
    interrupt it and counted such calls as successes. A worker process is killed at 1 s."""
    r, events = train(tmp_path, "regex_one_in_five", "--steps", "2", "--prompts-per-step", "2",
                      "--eval-size", "5", "--reward-timeout-s", "1", env={"HOSTILE_REGEX_N": "28"})
    assert r.returncode == 0, r.stdout + r.stderr
    train_failed, eval_failed, _ = counted(tmp_path, "regex_one_in_five")
    hangs = events.count("hang")
    assert hangs > 0
    assert events.count("done") == 0  # no call ran on to its end: each was stopped at its timeout
    assert train_failed + eval_failed == hangs


def test_a_run_whose_every_reward_fails_stops_and_names_the_reward(tmp_path):
    """Every reward is 1e39 (finite in Python, infinite in float32): the reward's fault, said so, and the run
    stops at its first step, before any update (exit 3, one line, no traceback: the reward did not raise).
    The --max-failed-reward-steps rule for later steps: tests/e2e/test_reward_sets.py."""
    r, events = train(tmp_path, "always_too_large", "--steps", "6", "--mode", "async",
                      "--max-failed-reward-steps", "3")
    assert r.returncode == 3, r.stdout + r.stderr
    assert (f"tether train: stopped: reward '{HOSTILE}:always_too_large' failed on every sample of the first step "
            "(step 0, 16 of 16), first error: out of range: returned 1e+39") in r.stdout
    assert "Traceback" not in r.stdout + r.stderr
    assert "non-finite loss" not in r.stdout + r.stderr
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not metrics.exists() or metrics.read_text() == ""  # step 0 stopped before its update
