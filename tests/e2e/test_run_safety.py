"""Fault-proof runs end to end (issue 13): each test recreates one failure of the fault-injection
campaign on a tiny run (no warm start, 2 steps) and checks what the user now sees.

One 2-step run is trained once per module and copied for each test that damages it."""

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.processes import started, tether_env
from tether.cli import main
from tether.train import checkpoint, setup
from tether.train.checkpoint import load_latest_checkpoint
from tether.train.config import TrainConfig
from tether.train.sync import train

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(prompts_per_step=2, group_size=2, max_new_tokens=4, warmstart_steps=0, eval_size=2, threads=1, seed=1,
             progress=False, checkpoint_every=1, lr=1e-3, plots=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "run"
    train(TrainConfig.from_flat(**SMALL, steps=2, out=str(run)))
    return run


@pytest.fixture
def run(trained, tmp_path):
    """A private copy of the 2-step run (checkpoints step_000001 and step_000002, metrics steps 0-1)."""
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    (copy / "run.lock").unlink(missing_ok=True)
    return copy


def _steps(run):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_fresh_run_into_an_existing_run_dir_is_refused(run):
    """Item 2: the second run exited 0, and pruning had deleted its own checkpoint (latest named a
    deleted folder). Now it is refused, and --overwrite starts over cleanly."""
    before = load_latest_checkpoint(run)["model"]
    with pytest.raises(ValueError, match="is not empty.*--resume.*--overwrite"):
        train(TrainConfig.from_flat(**SMALL, steps=1, out=str(run)))
    after = load_latest_checkpoint(run)
    assert after["run_state"]["step"] == 2 and all(torch.equal(before[k], after["model"][k]) for k in before)
    train(TrainConfig.from_flat(**SMALL, steps=1, out=str(run), overwrite=True))
    assert load_latest_checkpoint(run)["run_state"]["step"] == 1
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_000001"]
    assert _steps(run) == [0]


def test_a_torn_last_metrics_line_is_dropped_on_resume(run, caplog):
    """Item 3: ``error: Unterminated string starting at: line 1 column 4976``, naming no file."""
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "reward/mean": 0.5, "note": "cut he')
    with caplog.at_level(logging.WARNING):
        train(TrainConfig.from_flat(**SMALL, steps=3, resume=str(run)))
    assert "metrics.jsonl:3: the last line is torn" in caplog.text
    assert _steps(run) == [0, 1, 2]


def test_a_bad_metrics_line_stops_the_resume_before_any_model_is_built(run, monkeypatch):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(["{oops"] + lines[1:]) + "\n")

    def no_model(*a, **k):
        raise AssertionError("the model was built before the metrics file was checked")

    monkeypatch.setattr(setup, "build_policy", no_model)
    with pytest.raises(ValueError, match=f"{run / 'metrics.jsonl'}:1: invalid JSON"):
        train(TrainConfig.from_flat(**SMALL, steps=3, resume=str(run)))


def test_a_deleted_latest_resumes_from_the_step_folders_and_keeps_the_history(run):
    """Item 5: the resume silently restarted from step 0 and deleted metrics.jsonl. The first two
    lines (with their timings, which a rerun would change) must survive untouched."""
    history = (run / "metrics.jsonl").read_text().splitlines()
    (run / "checkpoints" / "latest").unlink()
    train(TrainConfig.from_flat(**SMALL, steps=3, resume=str(run)))
    assert (run / "metrics.jsonl").read_text().splitlines()[:2] == history
    assert _steps(run) == [0, 1, 2]


def test_lost_checkpoints_do_not_restart_over_the_history(run):
    history = (run / "metrics.jsonl").read_text()
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(checkpoint.CheckpointError, match="records steps up to 1, but there is no checkpoint"):
        train(TrainConfig.from_flat(**SMALL, steps=3, resume=str(run)))
    assert (run / "metrics.jsonl").read_text() == history


def test_a_run_killed_during_start_up_can_be_resumed(tmp_path, monkeypatch):
    """Item 8: ``no config.json there (not a tether run directory?)``."""
    run = tmp_path / "run"

    def killed(*a, **k):
        raise RuntimeError("killed while building the model")

    monkeypatch.setattr(setup, "build_policy", killed)
    with pytest.raises(RuntimeError, match="killed"):
        train(TrainConfig.from_flat(**SMALL, steps=1, out=str(run)))
    monkeypatch.undo()
    assert main(["train", "--resume", str(run)]) == 0
    assert load_latest_checkpoint(run)["run_state"]["step"] == 1


def test_leaked_temporaries_are_cleaned_when_the_run_resumes(run):
    """Item 6: every kill during a write leaked a temporary folder; on a full disk that kept it full."""
    leak = run / "checkpoints" / ".tmp-step_000003-99999"
    leak.mkdir()
    (leak / "state.pt").write_bytes(b"\0" * (1 << 20))
    (run / "checkpoints" / ".latest-99999").write_text("step_000003")
    train(TrainConfig.from_flat(**SMALL, steps=3, resume=str(run)))
    assert not leak.exists() and not (run / "checkpoints" / ".latest-99999").exists()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_stops_the_run_with_a_clear_message(tmp_path, monkeypatch, capsys):
    """Item 6: ``RuntimeError: [enforce fail at inline_container.cc:672]`` and a leaked temporary folder."""
    run = tmp_path / "run"
    writes = []

    def full_after_one(path, mode="r", *args, **kwargs):
        if os.path.basename(str(path)) == "state.pt" and ("w" in mode or "x" in mode):
            writes.append(path)
            if len(writes) > 1:
                return open("/dev/full", "wb")
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "open", full_after_one, raising=False)
    args = ["train", "--out", str(run), "--steps", "3", "--checkpoint-every", "1", "--prompts-per-step", "2",
            "--group-size", "2", "--max-new-tokens", "4", "--warmstart-steps", "0", "--eval-size", "2",
            "--threads", "1", "--no-progress", "--classic"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert (f"no space left on device while writing checkpoint step 2 to {run / 'checkpoints'}; "
            "the previous checkpoint step 1 is intact") in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_000001"]
    monkeypatch.undo()
    assert main(["train", "--resume", str(run)]) == 0
    assert load_latest_checkpoint(run)["run_state"]["step"] == 3


def test_a_second_process_on_a_live_run_dir_is_refused(run, tmp_path):
    """Item 7: two runs into one --out both exited 0, leaving interleaved metrics and mixed weights."""
    live = tmp_path / "live"
    cmd = [sys.executable, "-m", "tether", "train", "--out", str(live), "--steps", "100000", "--prompts-per-step",
           "2", "--group-size", "2", "--max-new-tokens", "4", "--warmstart-steps", "0", "--eval-size", "2",
           "--threads", "1", "--no-progress", "--classic"]
    with started(cmd, env=tether_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as p:
        while p.poll() is None and not (live / "metrics.jsonl").exists():  # pytest-timeout is the safety net
            time.sleep(0.1)
        assert p.poll() is None, "the live run ended early"
        for cfg in (TrainConfig.from_flat(**SMALL, steps=1, out=str(live)),
                    TrainConfig.from_flat(**SMALL, steps=1, resume=str(live))):
            with pytest.raises(ValueError, match=f"in use by another tether run \\(PID {p.pid} "):
                train(cfg)
    train(TrainConfig.from_flat(**SMALL, steps=1, resume=str(live)))  # the killed holder's lock is free again


def test_resume_says_which_reward_file_it_imports_before_importing_it(tmp_path, capsys):
    """Item 1: --resume imports whatever reward file the directory's config.json names."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)}) + "\n" for a in range(200)))
    reward = tmp_path / "my_reward.py"
    reward.write_text("import sys\nprint('REWARD MODULE RUNNING', file=sys.stderr)\n"
                      "def score(prompt, completion, answer):\n    return float(completion.strip() == answer)\n")
    run = tmp_path / "run"
    train(TrainConfig.from_flat(**SMALL, steps=1, task=str(data), reward=f"{reward}:score", out=str(run)))
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--steps", "2"]) == 0
    err = capsys.readouterr().err
    notice = f"importing {reward.resolve()}, which runs that code"
    assert notice in err and err.index(notice) < err.index("REWARD MODULE RUNNING")


def test_export_refuses_a_checkpoint_that_would_execute_code(run, tmp_path, capsys):
    """Item 1: ``tether export`` ran a pickled payload (torch.load weights_only=False)."""
    marker = tmp_path / "PWNED"
    folder = run / "checkpoints" / "step_000002"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"model": Payload()}, folder / "state.pt")
    (folder / "manifest.json").unlink(missing_ok=True)  # an older-format folder: no checksum to fail first
    (run / "checkpoints" / "step_000001" / "state.pt").unlink()
    try:
        rc = main(["export", str(run), "--out", str(tmp_path / "out")])
    finally:
        assert not marker.exists(), "loading the checkpoint ran its pickled code"
    assert rc == 2
    assert "step_000002: state.pt refused: loading it would execute code" in capsys.readouterr().err
