"""The run directory's start-up rules (issue 13, items 1, 2, 3, 6, 7, 8) and the signal handler (item 11),
without training anything: the lock, the fresh-run refusal, --overwrite, config.json first, the
reward notice, the metrics check, temporaries, and SIGINT / SIGTERM recorded at a step boundary."""

import json
import logging
import os
import signal
import sys

import pytest

from tests.processes import started
from tether.train.checkpoint import CheckpointError
from tether.train.config import TrainConfig
from tether.train.metrics_log import MetricsLog, check_metrics_file, read_metrics
from tether.train.run_dir import RunDirError, RunLock, open_run_dir, reward_notice
from tether.train.signals import Interrupted, StopOnSignal

pytestmark = pytest.mark.unit


def test_a_second_holder_is_refused_with_the_holders_pid(tmp_path):
    first = RunLock(tmp_path)
    first.acquire()
    try:
        with pytest.raises(RunDirError, match=rf"in use by another tether run \(PID {os.getpid()} on "):
            RunLock(tmp_path).acquire()
        with pytest.raises(RunDirError, match=f"PID {os.getpid()}"):
            with open_run_dir(TrainConfig.from_flat(resume=str(tmp_path)), "unused"):
                pass
    finally:
        first.release()
    second = RunLock(tmp_path)
    second.acquire()  # released: free again
    second.release()


def test_a_stale_lock_of_a_killed_process_is_taken_over(tmp_path, caplog):
    with started([sys.executable, "-c", "pass"]) as dead:
        dead.wait()
    (tmp_path / "run.lock").write_text(json.dumps({"pid": dead.pid, "host": "h", "started": "then"}))
    lock = RunLock(tmp_path)
    with caplog.at_level(logging.WARNING):
        lock.acquire()
    try:
        assert f"no longer running (PID {dead.pid} on h" in caplog.text
        assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def test_a_fresh_run_into_a_non_empty_dir_is_refused_unless_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000010").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 0}\n')
    (run / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match=f"not empty .*--resume {run}.*--overwrite"):
        with open_run_dir(TrainConfig.from_flat(out=str(run)), "unused"):
            pass
    assert (run / "checkpoints" / "step_000010").is_dir() and (run / "metrics.jsonl").exists()
    with open_run_dir(TrainConfig.from_flat(out=str(run), overwrite=True), "unused") as rd:
        assert rd.load_checkpoint() is None
        assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
        assert (run / "notes.txt").read_text() == "mine"  # only what a run writes is deleted
    assert "deleted the previous run's checkpoints, metrics.jsonl" in capsys.readouterr().err


def test_overwrite_and_resume_exclude_each_other():
    with pytest.raises(ValueError, match="'overwrite' cannot be combined with 'resume'"):
        TrainConfig.from_flat(overwrite=True, resume="runs/x")


def test_config_json_is_written_before_anything_is_built(tmp_path):
    """Item 8: config.json was written after the model was built, so a run killed during start-up could
    not be resumed. It is written on entry, without the overwrite flag (a resume must not overwrite)."""
    run = tmp_path / "run"
    with open_run_dir(TrainConfig.from_flat(out=str(run), steps=7, overwrite=True), "unused"):
        saved = json.loads((run / "config.json").read_text())
    assert saved["steps"] == 7 and saved["overwrite"] is False
    assert not (run / "run.lock").read_text()  # released


def test_leaked_temporaries_are_removed_at_start(tmp_path):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    (ckpts / ".tmp-step_000004-99999").mkdir(parents=True)
    (ckpts / ".tmp-step_000004-99999" / "state.pt").write_bytes(b"\0" * 4096)
    (ckpts / ".latest-99999").write_text("step_000004")
    (run / "metrics.tmp").write_text("{")
    (run / "config.json").write_text("{}")
    with open_run_dir(TrainConfig.from_flat(resume=str(run)), "unused"):
        assert sorted(p.name for p in ckpts.iterdir()) == []
        assert not (run / "metrics.tmp").exists()


def test_resume_names_the_reward_module_it_will_import(tmp_path, monkeypatch):
    """Item 1: --resume imports the reward file a run directory's config names; say which, first."""
    reward = tmp_path / "my_reward.py"
    reward.write_text("raise SystemExit('imported')\n")
    notice = reward_notice(TrainConfig.from_flat(resume="r", reward=f"{reward}:score"))
    assert str(reward.resolve()) in notice and "runs that code" in notice
    monkeypatch.syspath_prepend(str(tmp_path))
    assert f"module my_reward ({reward})" in reward_notice(TrainConfig.from_flat(resume="r", reward="my_reward:score"))
    assert reward_notice(TrainConfig.from_flat(resume="r", reward="exact_match")) is None


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
    """Item 3: a torn last line made the resume fail with a JSON error naming no file."""
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for s in range(3):
        log.write({"step": s, "loss": 0.5})
    with open(path, "a") as f:
        f.write('{"step": 3, "loss": 0.12345, "x": "unterminat')
    with caplog.at_level(logging.WARNING):
        assert check_metrics_file(path) == 2
    assert f"{path}:4: the last line is torn" in caplog.text
    MetricsLog(path, resume_after_step=2)
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2]


@pytest.mark.parametrize("bad, message", [("not json", "invalid JSON"), ("[1, 2]", "not a metrics record"),
                                          ('{"loss": 1}', "not a metrics record")])
def test_a_bad_metrics_line_before_the_last_names_file_and_line(tmp_path, bad, message):
    path = tmp_path / "metrics.jsonl"
    path.write_text(f'{{"step": 0}}\n{bad}\n{{"step": 2}}\n')
    with pytest.raises(ValueError, match=f"{path}:2: {message}"):
        check_metrics_file(path)


def test_a_signal_is_recorded_and_raised_at_the_step_boundary(tmp_path, capsys):
    (tmp_path / "checkpoints").mkdir()
    with StopOnSignal(tmp_path) as stop:
        stop.check(4)
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested()
        stop.check(4)  # no checkpoint of step 4 was written: run on to the next boundary
        (tmp_path / "checkpoints" / "latest").write_text("step_000005")
        with pytest.raises(Interrupted) as e:
            stop.check(5)
    assert str(e.value) == (f"stopped by SIGTERM after step 5; checkpoint step_000005 written; "
                            f"resume with: tether train --resume {tmp_path}")
    assert "finishing this step" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


def test_a_second_signal_abandons_the_step(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_000004")
    before = signal.getsignal(signal.SIGINT)  # the default handler, or SIG_IGN in a background job (CI)
    with pytest.raises(Interrupted) as e:
        with StopOnSignal(tmp_path):
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
    assert e.value.step is None and e.value.signum == signal.SIGINT
    assert "second SIGINT during a step; the last checkpoint step_000004 is intact; resume with" in str(e.value)
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_no_checkpoint_yet_is_judged_by_the_cadence_the_run_was_written_with(tmp_path):
    """A run with checkpoint_every 10 killed at step 1 has no checkpoint yet: its resume starts again
    from step 0, even when the resuming config says checkpoint_every 1. Past step 10 it refuses."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"checkpoint_every": 10}))
    (run / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1}\n')
    with open_run_dir(TrainConfig.from_flat(resume=str(run), checkpoint_every=1), "unused") as rd:
        assert rd.load_checkpoint() is None
    (run / "config.json").write_text(json.dumps({"checkpoint_every": 10}))
    (run / "metrics.jsonl").write_text("".join(f'{{"step": {s}}}\n' for s in range(11)))
    with open_run_dir(TrainConfig.from_flat(resume=str(run), checkpoint_every=1), "unused") as rd:
        with pytest.raises(CheckpointError, match="records steps up to 10, but there is no checkpoint"):
            rd.load_checkpoint()
