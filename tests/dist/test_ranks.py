"""Issue 16's sharded trainer ranks for real: ``--trainer-ranks 2`` starts a second trainer process, the model is
FSDP2-sharded over gloo on CPU, and each step's rows are split between the ranks with the loss normalised over
the whole mini-batch. Each scenario (tests/dist/ranks_scenario.py) runs in a child process inside its own
network and PID namespaces (tests/dist/netns.py: only loopback up, the rank processes bind 127.0.0.1, and every
process the child started dies with it). No Ray (the rollout worker runs in the trainer's process) except in
the test with Ray workers, skipped without ray.

T2: 2 ranks train the 1-rank weights and optimiser state (float64, 1e-10; the scenario's docstring says why not
fp32). T6: a 2-rank checkpoint resumes with 1 rank, and a 1-rank one with 2, to the uninterrupted weights.
A trainer rank SIGKILLed mid-run stops the run within its timeout with an error naming the rank, and the run
resumes from its last checkpoint. Also: the CLI under torchrun, and SIGTERM's clean stop with 2 ranks.
"""

import json
import sys

import pytest

from tests.dist.netns import isolation_skip_reason, ray_python, run_isolated
from tests.processes import tether_env

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
TOL = 1e-10


def scenario(which: str, tmp_path, python: str = sys.executable) -> dict:
    reason = isolation_skip_reason()
    if reason:
        pytest.skip(reason)
    done = run_isolated([python, "-m", "tests.dist.ranks_scenario", which, str(tmp_path)], timeout=240,
                        env=tether_env(OMP_WAIT_POLICY="PASSIVE", RAY_USAGE_STATS_ENABLED="0"))
    lines = [line for line in done.stdout.splitlines() if line.startswith("SCENARIO ")]
    assert done.returncode == 0 and lines, f"scenario failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return json.loads(lines[-1].removeprefix("SCENARIO "))


def test_two_trainer_ranks_train_the_one_rank_weights(tmp_path):
    got = scenario("parity", tmp_path)
    assert got["errors"] == ["", ""]
    assert got["moved"] > 1e-4  # the steps changed the weights: the comparison below has something to compare
    assert got["diff_step1"] < TOL and got["diff"] < TOL, got
    for a, b in zip(*got["grad_norm"]):  # the global gradient norm, clipped the same way
        assert abs(a - b) < 1e-9 * max(1.0, a)
    assert got["rank_log"]  # rank 1 ran as its own process, logging to RUN/ranks/rank-1.log


def test_two_ray_workers_with_two_trainer_ranks_train_the_one_process_weights(tmp_path):
    """Issue 16 T1 and T2 together: Ray rollout workers (actors on 127.0.0.1) feed a 2-rank sharded trainer."""
    py = ray_python()
    if py is None:
        pytest.skip("ray is not installed (pip install -e '.[dist]', or a .venv-ray in the repository)")
    got = scenario("ray", tmp_path, python=py)
    assert got["errors"] == ["", ""]
    assert got["moved"] > 1e-4 and got["diff"] < TOL, got


def test_a_killed_trainer_rank_stops_the_run_naming_it_and_the_run_resumes_on_one_rank(tmp_path):
    got = scenario("kill", tmp_path)
    killed = got["killed"]
    assert "TrainerRankFailed" in killed["error"] and "trainer rank 1" in killed["error"], killed["error"]
    assert "SIGKILL" in killed["error"] and "step 2" in killed["error"]
    assert "The last checkpoint, step 2" in killed["error"]  # what a resume starts from
    assert killed["steps_logged"] == [0, 1] and killed["checkpoints"][-1] == "step_000002"
    assert killed["seconds"] < 60  # gloo reports the closed connection at once; 30 s sync_timeout_s bounds a hang
    assert got["errors"] == ["", ""]
    assert got["steps_after_resume"] == [0, 1, 2]  # step 2 logged once, after the resume
    assert got["moved"] > 1e-4 and got["diff"] < TOL, got


def test_a_hung_trainer_rank_fails_the_run_within_the_timeout(tmp_path):
    got = scenario("hang", tmp_path)
    assert "TrainerRankFailed" in got["error"] and "did not answer within 5 s" in got["error"], got["error"]
    assert "step 1" in got["error"] and "The last checkpoint, step 1" in got["error"]
    assert got["steps_logged"] == [0]
    assert got["seconds"] < 90  # 5 s timeout + 2 s looking for a dead rank + 5 s grace before the kill + start-up


def test_a_one_rank_checkpoint_resumes_on_two_ranks(tmp_path):
    """The 2-rank step runs in micro-batches of 7 of the 8 rows: rank 1 has no row of the second one and enters
    its collectives with a weight-0 row; the weights are still the uninterrupted run's."""
    got = scenario("grow", tmp_path)
    assert got["errors"] == ["", "", ""]
    assert got["moved"] > 1e-4 and got["diff"] < TOL, got


def test_the_cli_under_torchrun(tmp_path):
    """``torchrun --standalone --nproc-per-node 2 -m tether.cli train --trainer-ranks 2``: torchrun starts both
    ranks and serves the store (TORCHELASTIC_USE_AGENT_STORE); rank 1 follows rank 0 (and takes its config), rank
    0 writes the run; torchrun exits 0 only if both ranks did (a rank that never joined would leave rank 0
    waiting in its first collective)."""
    reason = isolation_skip_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "run"
    done = run_isolated([
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "tether.cli",
        "train", "--mode", "dist", "--rollout-workers", "0", "--trainer-ranks", "2", "--steps", "2",
        "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4", "--warmstart-steps", "0",
        "--eval-size", "2", "--threads", "1", "--no-progress", "--out", str(out)],
        timeout=240, env=tether_env(OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]  # rank 0 waited for rank 1 in every collective of both steps
    assert (out / "summary.json").exists() and (out / "checkpoints" / "step_000002").is_dir()
    assert json.loads((out / "config.json").read_text())["trainer_ranks"] == 2
    assert not (out / "ranks").exists()  # the launcher started rank 1, not tether


def test_sigterm_stops_two_trainer_ranks_cleanly_at_a_checkpoint(tmp_path):
    got = scenario("signal", tmp_path)
    assert got["returncode"] == 128 + 15, got["output"]
    assert "--resume" in got["output"]  # the one line that says how to continue
    assert got["checkpoints"] == [f"step_{got['rows']:06d}"], got  # the stopping step, gathered from both ranks
    assert got["left"] == []  # rank 1 was told to stop (or killed): nothing of the run is left running
