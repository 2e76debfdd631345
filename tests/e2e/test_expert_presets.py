"""CalibRL and RL-PLUS train on a dataset's expert solutions; every preset of the registry either
trains a step in `tether train` or is refused at start-up, before any model is built."""

from __future__ import annotations

import json
import math
import re
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.processes import run as run_child
from tests.processes import tether_command, tether_env
from tether.objectives.registry import get_preset, presets
from tether.train import async_loop, expert, setup, sync
from tether.train import run as run_module
from tether.train.config import TrainConfig, TrainMode

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
TINY = dict(prompts_per_step=4, group_size=4, max_new_tokens=6, warmstart_steps=30, eval_size=10, threads=1,
            progress=False, seed=1, plots=False)
TEACHER_INPUTS = {"logp_teacher_BT", "logp_theta_BTV", "logp_teacher_BTV"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    """Single-digit additions; the expert solution in an `expert` column on a third of the rows and in
    `solution` on the rest."""
    path = tmp_path_factory.mktemp("data") / "add.jsonl"
    with open(path, "w") as f:
        for a in range(10):
            for b in range(10):
                column = "expert" if (a + b) % 3 == 0 else "solution"
                f.write(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b), column: str(a + b)}) + "\n")
    return str(path)


def run(out: Path, **kw) -> list[dict]:
    sync.train(TrainConfig.from_flat(out=str(out), **{**TINY, **kw}))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def masked_expert_rows(monkeypatch):
    """From now on the expert rows are appended with no loss token (same rows, groups, prompts)."""
    real = expert.expert_rollout

    def no_tokens(*args, **kw):
        r = real(*args, **kw)
        return replace(r, completion_len_B=torch.zeros_like(r.completion_len_B))

    monkeypatch.setattr(expert, "expert_rollout", no_tokens)


def test_calibrl_trains_on_the_expert_rows(dataset, tmp_path, monkeypatch):
    steps = run(tmp_path / "calibrl", task=dataset, objective="calibrl", steps=3)
    assert len(steps) == 3
    for s in steps:  # one expert row per group, scored by the task's reward, seen by the preset
        assert s["expert/rows"] == 4 and s["expert/reward_mean"] == 1.0 and s["expert/tokens_mean"] >= 2
        assert s["calibrl/expert_frac"] == pytest.approx(1 / 5)
        assert s["expert/logp_old_mean"] < 0 and math.isfinite(s["loss"])
    assert any(s["calibrl/guided_loss"] != 0 for s in steps)
    # the same run against a zero baseline instead of pi_old's expert log-probs: another loss
    monkeypatch.setattr(expert, "expert_baseline", lambda logp_old_BT, *a: torch.zeros_like(logp_old_BT))
    zero = run(tmp_path / "zero", task=dataset, objective="calibrl", steps=3)
    assert zero[0]["reward/mean"] == steps[0]["reward/mean"]  # the same samples at step 0
    assert [s["loss"] for s in zero] != [s["loss"] for s in steps]
    monkeypatch.undo()
    masked_expert_rows(monkeypatch)
    masked = run(tmp_path / "masked", task=dataset, objective="calibrl", steps=3)
    assert [s["loss"] for s in masked] != [s["loss"] for s in steps]


def test_rl_plus_trains_on_the_expert_tokens(dataset, tmp_path, monkeypatch):
    steps = run(tmp_path / "rl_plus", task=dataset, objective="rl_plus", steps=3)
    assert len(steps) == 3
    for s in steps:
        assert s["expert/rows"] == 4 and s["expert/reward_mean"] == 1.0
        assert 0 < s["rlplus/off_policy_prob"] < 1  # mean pi_theta over expert tokens in the loss mask
        assert s["rlplus/off_ratio_mean"] > 0
    assert any(s["rlplus/off_pg_loss"] != 0 for s in steps)
    masked_expert_rows(monkeypatch)
    masked = run(tmp_path / "masked", task=dataset, objective="rl_plus", steps=3)
    assert all(s["rlplus/off_policy_prob"] == 0 and s["rlplus/off_pg_loss"] == 0 for s in masked)
    assert masked[0]["loss"] != steps[0]["loss"]


def test_the_step_marks_the_expert_rows_and_keeps_them_out_of_group_statistics_and_meter(dataset, tmp_path,
                                                                                         monkeypatch):
    """What the sync loop hands its update: P sampled groups of G rows, then one expert row per group,
    marked by expert_B; advantages with the group mean over sampled rows only; the meter on sampled rows."""
    seen = {}
    real = run_module.update_phase

    def spy(cfg, preset, args, model, optimizer, rollout, keep_B, logp_old_BT, logp_ref_BT, advantages_BT, step,
            **kw):
        seen.update(rollout=rollout, logp_old_BT=logp_old_BT, advantages_BT=advantages_BT, **kw["extra_inputs"])
        return real(cfg, preset, args, model, optimizer, rollout, keep_B, logp_old_BT, logp_ref_BT, advantages_BT,
                    step, **kw)

    monkeypatch.setattr(run_module, "update_phase", spy)
    (step,) = run(tmp_path / "spy", task=dataset, objective="calibrl", steps=1)
    P, G = TINY["prompts_per_step"], TINY["group_size"]
    rollout, expert_B = seen["rollout"], seen["expert_B"]
    assert rollout.batch_size == P * (G + 1) and expert_B.tolist() == [False] * (P * G) + [True] * P
    assert rollout.group_B.tolist() == [g for g in range(P) for _ in range(G)] + list(range(P))
    mask = rollout.loss_mask_BT
    A_B = torch.stack([seen["advantages_BT"][b][mask[b]][0] for b in range(rollout.batch_size)]).double()
    for g in range(P):  # dr_grpo over the sampled rows: they sum to 0; the expert row (R_e = 1) gets 1 - mean
        A_s, A_e = A_B[g * G:(g + 1) * G], A_B[P * G + g]
        assert abs(float(A_s.sum())) < 1e-6
        assert all(min(abs(float(A_e - a)), abs(float(A_e - a) - 1.0)) < 1e-6 for a in A_s)
    base = seen["logp_expert_old_BT"]
    for b in range(P * G):  # pi_old's log-probs of the group's expert, position by position
        e, p, k = P * G + b // G, int(rollout.prompt_len_B[b]), int(rollout.completion_len_B[b])
        n = min(k, int(rollout.completion_len_B[e]))
        assert torch.equal(base[b, p:p + n], seen["logp_old_BT"][e, p:p + n]) and (base[b, p + n:] == 0).all()
    assert step["mismatch/abs_logp_diff_max"] < 1e-4  # expert tokens (mu = omega) would be far off pi_old


def refuse_models(monkeypatch):
    def build_policy(*args, **kw):
        raise AssertionError("a model was built before the preset was refused")

    monkeypatch.setattr(setup, "build_policy", build_policy)


@pytest.mark.parametrize("name", sorted(presets()))
def test_every_preset_trains_a_step_or_is_refused_at_start_up(name, tmp_path, monkeypatch):
    preset = get_preset(name)
    cfg = TrainConfig.from_flat(objective=name, steps=1, out=str(tmp_path / name), **TINY)
    if TEACHER_INPUTS & set(preset.requires):
        refuse_models(monkeypatch)
        with pytest.raises(ValueError, match=f"objective '{name}' needs .*use `tether distill --objective {name}`"):
            sync.train(cfg)
        return
    summary = sync.train(cfg)
    (step,) = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(step["loss"]) and "alarm/non_finite" not in step and summary["steps"] == 1


@pytest.mark.parametrize("name", ["calibrl", "rl_plus"])
def test_async_refuses_expert_presets_before_any_model(name, tmp_path, monkeypatch):
    refuse_models(monkeypatch)
    with pytest.raises(ValueError, match=f"objective '{name}' needs LossInputs.expert_B.*use --mode sync"):
        async_loop.train(TrainConfig.from_flat(objective=name, mode=TrainMode.ASYNC, steps=1, out=str(tmp_path), **TINY))


def tether(*args: str) -> subprocess.CompletedProcess:
    return run_child(tether_command(*args), env=tether_env())


def test_cli_checks_and_trains_an_expert_dataset_and_refuses_distillation(dataset, tmp_path):
    shown = tether("tasks", dataset)
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"^expert solutions: (\d+) of \1 training rows \(calibrl, rl_plus can train\)$", shown.stdout, re.M)
    flags = ["--steps", "2", "--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "6",
             "--warmstart-steps", "30", "--eval-size", "10", "--threads", "1", "--no-progress"]
    trained = tether("train", "--task", dataset, "--objective", "rl_plus", "--out", str(tmp_path / "run"), *flags)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(s["expert/rows"] == 4 and s["rlplus/off_policy_prob"] > 0 for s in lines)
    refused = tether("train", "--objective", "opd", "--out", str(tmp_path / "opd"), *flags)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "tether train: error: objective 'opd' needs LossInputs.logp_teacher_BT" in refused.stderr
    assert "use `tether distill --objective opd`" in refused.stderr
    assert not (tmp_path / "opd" / "metrics.jsonl").exists()
