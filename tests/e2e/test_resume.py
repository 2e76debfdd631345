"""A run killed with SIGKILL at any moment, or stopped with SIGINT, resumes from its last checkpoint to
bitwise-identical weights."""

import json
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from tests.limits import CHILD_TIMEOUT_S, HEAVY_TIMEOUT_S
from tests.processes import started, tether_command, tether_env
from tether.train.checkpoint import load_checkpoint_dir

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(HEAVY_TIMEOUT_S)]
ARGS = ["--steps", "8", "--checkpoint-every", "2", "--prompts-per-step", "4", "--group-size", "4",
        "--max-new-tokens", "6", "--warmstart-steps", "30", "--eval-size", "10", "--threads", "2",
        "--seed", "3", "--no-progress", "--no-plots", "--objective", "ppo", "--epochs", "2", "--minibatches", "2"]


@contextmanager
def tether_train(log: Path, *args):
    """A `tether train` child writing its output to ``log`` (a file: a pipe nobody reads while the
    test polls could fill up and stall the child); killed with its group and reaped on leaving."""
    with open(log, "a") as out, started(tether_command("train", *args), env=tether_env(), stdin=subprocess.DEVNULL,
                                        stdout=out, stderr=subprocess.STDOUT) as p:
        yield p


def run_to_end(log: Path, *args) -> None:
    with tether_train(log, *args) as p:
        p.wait(timeout=CHILD_TIMEOUT_S)
    assert p.returncode == 0, log.read_text()


def latest_checkpoint_step(run: Path) -> int:
    latest = run / "checkpoints" / "latest"
    try:
        return int(latest.read_text().split("_")[1])
    except (OSError, IndexError, ValueError):  # not written yet (or being replaced)
        return -1


def final_state(run: Path) -> dict:
    return load_checkpoint_dir(run / "checkpoints" / "step_000008").state


def assert_same_state(a: dict, b: dict) -> None:
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in pa:
            assert torch.equal(pa[k], pb[k]), k
    assert a["run_state"]["step"] == b["run_state"]["step"] == 8


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must equal."""
    ref = tmp_path_factory.mktemp("resume") / "ref"
    run_to_end(ref.parent / "ref.log", *ARGS, "--out", str(ref))
    return ref


def assert_same_run(ref: Path, run: Path) -> None:
    assert_same_state(final_state(ref), final_state(run))
    ref_lines = (ref / "metrics.jsonl").read_text().splitlines()
    got_lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(got_lines) == len(ref_lines) == 8
    for a, b in zip(ref_lines, got_lines):
        a, b = json.loads(a), json.loads(b)
        assert a["reward/mean"] == b["reward/mean"] and a["loss"] == b["loss"]


def test_sigkill_then_resume_is_bitwise_identical(reference, tmp_path):
    """Killed inside a step after its second checkpoint (one kill: each costs a run and a resume, and where
    it lands inside the step varies from run to run anyway)."""
    run, log = tmp_path / "killed", tmp_path / "killed.log"
    with tether_train(log, *ARGS, "--out", str(run)) as p:
        # no wall-clock deadline: on a slow machine the checkpoint just comes later (pytest-timeout
        # is the safety net, and leaving the block kills the child whatever happens)
        while p.poll() is None and latest_checkpoint_step(run) < 4:
            time.sleep(0.02)
        assert p.poll() is None, f"the run finished before it could be killed; make it longer\n{log.read_text()}"
        time.sleep(0.1)  # land somewhere inside a later step
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert latest_checkpoint_step(run) < 8, "killed after the last checkpoint: nothing left to resume"
    run_to_end(log, "--resume", str(run))
    assert_same_run(reference, run)


def test_sigint_stops_at_a_step_boundary_with_a_checkpoint_and_resumes_bitwise(reference, tmp_path):
    """Item 11 of issue 13: Ctrl-C (SIGINT) ends the step, writes a checkpoint at that boundary (here
    between the regular ones: --checkpoint-every 100), prints one line saying how to resume, and no
    KeyboardInterrupt traceback. The resume equals the uninterrupted run bit for bit."""
    run = tmp_path / "interrupted"
    log = tmp_path / "interrupted.log"
    metrics = run / "metrics.jsonl"
    with tether_train(log, *ARGS, "--checkpoint-every", "100", "--out", str(run)) as p:
        while p.poll() is None and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
            time.sleep(0.02)
        assert p.poll() is None, f"the run finished before it could be interrupted; make it longer\n{log.read_text()}"
        p.send_signal(signal.SIGINT)
        p.wait(timeout=CHILD_TIMEOUT_S)
    out = log.read_text()
    assert p.returncode == 128 + signal.SIGINT, out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    step = len(metrics.read_text().splitlines())
    assert 2 <= step < 8
    assert (run / "checkpoints" / "latest").read_text() == f"step_{step:06d}"
    resume_lines = [line for line in out.splitlines() if "resume with" in line]
    assert resume_lines == [f"tether train: stopped by SIGINT after step {step}; checkpoint step_{step:06d} "
                            f"written; resume with: tether train --resume {run}"], out
    run_to_end(tmp_path / "resume.log", "--resume", str(run))
    assert_same_run(reference, run)
