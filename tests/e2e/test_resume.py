"""A run killed with SIGKILL at any moment, or stopped with SIGINT, resumes from its last checkpoint to
bitwise-identical weights."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tether.train.checkpoint import load_checkpoint_dir

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--steps", "8", "--checkpoint-every", "2", "--prompts-per-step", "4", "--group-size", "4",
        "--max-new-tokens", "6", "--warmstart-steps", "30", "--eval-size", "10", "--threads", "2",
        "--seed", "3", "--no-progress", "--objective", "ppo", "--epochs", "2", "--minibatches", "2"]


def tether(*args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "tether", "train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


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
    p = tether(*ARGS, "--out", str(ref))
    out, _ = p.communicate(timeout=240)
    assert p.returncode == 0, out
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
    for kill_after_checkpoint in (2, 4):
        run = tmp_path / f"killed{kill_after_checkpoint}"
        p = tether(*ARGS, "--out", str(run))
        latest = run / "checkpoints" / "latest"
        deadline = time.time() + 240
        while time.time() < deadline and p.poll() is None:
            if latest.exists() and int(latest.read_text().split("_")[1]) >= kill_after_checkpoint:
                break
            time.sleep(0.02)
        assert p.poll() is None, "the run finished before it could be killed; make it longer"
        time.sleep(0.05 * kill_after_checkpoint)  # land somewhere inside a later step
        p.send_signal(signal.SIGKILL)
        p.wait()
        r = tether("--resume", str(run))
        out, _ = r.communicate(timeout=240)
        assert r.returncode == 0, out
        assert_same_run(reference, run)


def test_sigint_stops_at_a_step_boundary_with_a_checkpoint_and_resumes_bitwise(reference, tmp_path):
    """Item 11 of issue 13: Ctrl-C (SIGINT) ends the step, writes a checkpoint at that boundary (here
    between the regular ones: --checkpoint-every 100), prints one line saying how to resume, and no
    KeyboardInterrupt traceback. The resume equals the uninterrupted run bit for bit."""
    run = tmp_path / "interrupted"
    p = tether(*ARGS, "--checkpoint-every", "100", "--out", str(run))
    try:
        metrics = run / "metrics.jsonl"
        deadline = time.time() + 240
        while time.time() < deadline and p.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                break
            time.sleep(0.02)
        assert p.poll() is None, "the run finished before it could be interrupted; make it longer"
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=240)
    finally:
        p.kill()
        p.wait()
    assert p.returncode == 128 + signal.SIGINT, out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    step = len(metrics.read_text().splitlines())
    assert 2 <= step < 8
    assert (run / "checkpoints" / "latest").read_text() == f"step_{step:06d}"
    resume_lines = [line for line in out.splitlines() if "resume with" in line]
    assert resume_lines == [f"tether train: stopped by SIGINT after step {step}; checkpoint step_{step:06d} "
                            f"written; resume with: tether train --resume {run}"], out
    r = tether("--resume", str(run))
    out, _ = r.communicate(timeout=240)
    assert r.returncode == 0, out
    assert_same_run(reference, run)
