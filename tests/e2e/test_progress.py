"""Issue 20 item 3: every long phase shows progress, in a terminal (a bar) and through a pipe (plain lines from the
first step), and the run directory keeps the same lines in progress.log; --quiet prints nothing but errors."""

import os
import pty
import re
import select
import subprocess

import pytest

from tests.limits import CHILD_TIMEOUT_S
from tests.processes import run as run_child
from tests.processes import started, tether_command, tether_env
from tether.train.progress import Reporter, auto_every, plain_line

pytestmark = pytest.mark.e2e
FLAGS = ["--steps", "4", "--warmstart-steps", "7", "--eval-size", "6", "--prompts-per-step", "2", "--group-size", "2",
         "--max-new-tokens", "4", "--threads", "1", "--checkpoint-every", "4",
         "--classic"]  # the sync loop's phases (the default job's async phase: test_default_job.py)


def test_auto_every_gives_about_ten_lines_and_log_every_overrides():
    assert auto_every(100, None) == 10
    assert auto_every(400, None) == 40
    assert auto_every(7, None) == 1
    assert auto_every(400, 3) == 3


def test_plain_line_shows_metrics_and_an_eta_from_this_sessions_pace():
    line = plain_line("RL", 5, 10, {"reward/mean": 0.25, "loss": 0.5, "meter/total/ess_token": 0.99,
                                    "ignored/key": 1}, elapsed_s=10.0, done_here=5)
    assert line == "RL 5/10  reward 0.25  loss 0.5  ess 0.99  elapsed 0:00:10  eta 0:00:10"
    resumed = plain_line("RL", 8, 10, {}, elapsed_s=6.0, done_here=2)  # resumed at step 6: 3 s a step
    assert resumed.endswith("eta 0:00:06")


def test_phase_prints_first_every_kth_and_last_step_and_logs_them(tmp_path):
    log = tmp_path / "progress.log"
    out = tmp_path / "out.txt"
    with open(out, "w") as stream:
        reporter = Reporter(log_every=3, log_path=log, interactive=False, stream=stream)
        with reporter.phase("RL", total=7) as bar:
            for i in range(7):
                bar.advance({"reward/mean": i})
        reporter.note("eval after training: 50.0%")
    shown = out.read_text().splitlines()
    assert [s.split("  ")[0] for s in shown[1:-1]] == ["RL 1/7", "RL 3/7", "RL 6/7", "RL 7/7"]
    assert shown[0] == "RL: 7 steps" and shown[-1] == "eval after training: 50.0%"
    logged = log.read_text().splitlines()
    assert [x.split("  ", 1)[1] for x in logged] == shown  # the same lines, each after a timestamp


def test_a_piped_run_prints_every_phase_and_writes_progress_log(tmp_path):
    out = tmp_path / "run"
    proc = run_child(tether_command("train", *FLAGS, "--log-every", "2", "--out", str(out)), env=tether_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    first = next(i for i, x in enumerate(lines) if x.startswith("warm start"))
    assert lines[first] == "warm start: 7 steps"  # the first line comes before any training step
    assert [x.split("  ")[0] for x in lines if re.match(r"RL \d", x)] == ["RL 1/4", "RL 2/4", "RL 4/4"]
    assert any(x.startswith("eval before training: accuracy on 6 held-out problems") for x in lines)
    assert any(x.startswith("eval after training: accuracy on 6 held-out problems") for x in lines)
    assert "held-out accuracy" in proc.stdout  # the end-of-run table
    logged = (out / "progress.log").read_text()
    assert "RL 4/4" in logged and "eval after training" in logged


def test_quiet_prints_nothing_but_still_logs(tmp_path):
    out = tmp_path / "run"
    proc = run_child(tether_command("train", *FLAGS, "--quiet", "--out", str(out)), env=tether_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == ""
    assert "RL 4/4" in (out / "progress.log").read_text()
    assert (out / "summary.json").exists()


def test_a_terminal_gets_a_bar_not_plain_lines(tmp_path):
    """stdout and stderr on a pseudo-terminal: rich draws its bar (ANSI control codes), no plain step lines."""
    out = tmp_path / "run"
    leader, follower = pty.openpty()
    chunks = []
    with started(tether_command("train", *FLAGS, "--out", str(out)), env=tether_env(COLUMNS="120"),
                 stdin=subprocess.DEVNULL, stdout=follower, stderr=follower) as proc:
        os.close(follower)
        while True:  # read until the child closes the terminal (it exits); bounded by the child's own limit
            ready, _, _ = select.select([leader], [], [], CHILD_TIMEOUT_S)
            if not ready:
                raise TimeoutError("tether train wrote nothing to its terminal")
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the child closed its side
                break
            if not data:
                break
            chunks.append(data)
        proc.wait(timeout=CHILD_TIMEOUT_S)
    os.close(leader)
    text = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0, text[-3000:]
    assert "\x1b[" in text  # the bar redraws with control codes
    assert "RL" in text and "4/4" in text
    assert not re.search(r"^RL \d+/4 ", text, flags=re.M)  # no plain line printed over the bar
    assert "eval before training" in text  # notes still reach the terminal
    assert "RL 4/4" in (out / "progress.log").read_text()


def test_log_every_must_be_positive():
    from tether.train.config import TrainConfig

    with pytest.raises(ValueError, match="log_every"):
        TrainConfig.from_flat(log_every=0)


def test_the_lab_shows_its_progress_through_a_pipe_and_markdown_stays_clean():
    proc = run_child(tether_command("lab", "--mismatch", "staleness", "--objectives", "grpo,tis"), env=tether_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lab: exact moments: 8 steps" in proc.stdout and "lab: exact moments 8/8" in proc.stdout
    md = run_child(tether_command("lab", "--mismatch", "staleness", "--objectives", "grpo", "--markdown"),
                   env=tether_env())
    assert md.returncode == 0 and md.stdout.startswith("| objective |"), md.stdout[:300]
