"""FAKER-Air's recipe from `tether train` (issue 19 item 4): the class-wise reward with its constraint terms,
the rank_ema advantage and the PI-controlled KL coefficient each reach a run, log what only they produce, and
keep their state in the checkpoint so a resume continues it exactly."""

import json
import math
from pathlib import Path

import pytest

from tests.processes import run as run_child
from tests.processes import tether_command, tether_env
from tether.train import sync
from tether.train.checkpoint import load_latest_checkpoint
from tether.train.config import TrainConfig
from tether.train.metrics_log import read_metrics

pytestmark = pytest.mark.e2e
TINY = dict(prompts_per_step=4, group_size=4, max_new_tokens=4, warmstart_steps=20, eval_size=8, threads=1,
            progress=False, seed=2, plots=False)
BOUNDS = "0,5,10,15,19"


def graded_sums(tmp_path: Path) -> str:
    """Single-digit sums: answers 0..18, four classes at 0/5/10/15 (the last two 'high')."""
    path = tmp_path / "sums.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                            for a in range(10) for b in range(10)))
    return str(path)


def test_classwise_reward_rank_ema_and_kl_controller_in_a_run_and_its_resume(tmp_path):
    task = graded_sums(tmp_path)
    flat = dict(task=task, class_bounds=BOUNDS, class_fa_penalty=0.3, advantage="rank_ema", adv_ema_coeff=0.5,
                kl_placement="loss", kl_estimator="k3plus", kl_coef=0.01, kl_target=1e-4, kl_kp=5.0, **TINY)
    sync.train(TrainConfig.from_flat(out=str(tmp_path / "a"), steps=3, **flat))
    rows = read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert len(rows) == 3
    for r in rows:
        # the class reward replaced the task's: shaped = class reward + the constraint terms (no other shaping)
        assert 0.0 <= r["class/recall"] <= 1.0 and 0.0 <= r["class/far"] <= 1.0
        assert -0.3 <= r["class/reward_mean"] <= 1.0
        assert "class/lambda_rec" in r and "class/lambda_far" in r and "kl/coef" in r
    # the controller moved kl_coef off its start (the KL is above its tiny target after the first update)
    assert rows[-1]["kl/coef"] != pytest.approx(0.01, rel=1e-9)
    state = load_latest_checkpoint(tmp_path / "a")["run_state"]["classwise"]
    assert {"lam_rec", "lam_far", "recall_ema", "far_ema", "adv_ema_mean", "adv_ema_var", "kl_coef", "kl_ema"} <= set(state)
    assert state["kl_coef"] == pytest.approx(rows[-1]["kl/coef"])
    # resume: 2 steps, then continue to 3 from the checkpoint; the state and metrics match the straight run
    sync.train(TrainConfig.from_flat(out=str(tmp_path / "b"), steps=2, checkpoint_every=1, **flat))
    sync.train(TrainConfig.from_flat(out=str(tmp_path / "b"), steps=3, checkpoint_every=1, resume=str(tmp_path / "b"), **flat))
    resumed = load_latest_checkpoint(tmp_path / "b")["run_state"]["classwise"]
    assert read_metrics(tmp_path / "b" / "metrics.jsonl")[-1]["kl/coef"] == pytest.approx(rows[-1]["kl/coef"], rel=1e-9)
    assert resumed.keys() == state.keys()
    for k in state:
        assert math.isclose(resumed[k], state[k], rel_tol=1e-9, abs_tol=1e-12), k


def test_classwise_flags_from_the_cli_and_their_edge_checks(tmp_path):
    task = graded_sums(tmp_path)
    out = tmp_path / "cli"
    args = ["--task", task, "--steps", "2", "--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "4",
            "--warmstart-steps", "20", "--eval-size", "8", "--threads", "1", "--seed", "2", "--no-progress",
            "--no-plots", "--out", str(out), "--class-bounds", BOUNDS, "--class-high-from", "1",
            "--no-class-constraints", "--advantage", "rank_ema", "--adv-ema-coeff", "0"]
    proc = run_child(tether_command("train", "--classic", *args), env=tether_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(out / "metrics.jsonl")
    config = json.loads((out / "config.json").read_text())
    assert config["class_bounds"] == BOUNDS and config["advantage"] == "rank_ema"
    for r in rows:
        assert "class/lambda_rec" not in r  # --no-class-constraints: the plain class reward
        assert r["reward/shaped_mean"] == pytest.approx(r["class/reward_mean"], abs=1e-6)
        assert r["advantage/mean"] == pytest.approx(0.0, abs=1e-6)  # c = 0: the centred rank alone, mean 0
    bad = run_child(tether_command("train", "--classic", "--task", task, "--class-bounds", "5,1", "--out",
                                   str(tmp_path / "bad")), env=tether_env())
    assert bad.returncode != 0 and "class_bounds" in bad.stderr
