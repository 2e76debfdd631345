"""``tether train --alp``: the layerwise perturbation trains its per-layer scales inside the ordinary trainer, logs
their trajectories, keeps fixed scales fixed, and resumes bitwise (its scales and noise seeds are in the checkpoint)."""

from __future__ import annotations

import pytest
import torch

from tests.e2e.test_train_flags import SMALL, varied_reward
from tether.cli import main
from tether.train import sync
from tether.train.checkpoint import load_latest_checkpoint
from tether.train.config import TrainConfig
from tether.train.metrics_log import read_metrics

pytestmark = pytest.mark.e2e
ALP = dict(alp=True, alp_std=0.05, alp_lr=0.05, objective="alp_seq")


def train(tmp_path, name, **kw):
    cfg = TrainConfig.from_flat(**{**SMALL, **varied_reward(tmp_path), "out": str(tmp_path / name), **kw})
    sync.train(cfg)
    return read_metrics(tmp_path / name / "metrics.jsonl")


def test_tether_train_alp_learns_the_layer_scales_and_logs_them(tmp_path):
    task = varied_reward(tmp_path)
    out = tmp_path / "cli"
    argv = ["train", "--alp", "--alp-std", "0.05", "--alp-lr", "0.05", "--objective", "alp_seq",
            "--task", task["task"], "--reward", task["reward"], "--out", str(out), "--quiet", "--threads", "1"]
    argv += [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items() if k not in ("progress", "threads", "plots")]
    argv += ["--no-plots"]
    assert main(argv) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert len(rows) == SMALL["steps"]
    for row in rows:
        sigmas = [row[f"alp/sigma_l{i}"] for i in range(4)]  # the built-in model's 4 layers
        assert all(s > 0 for s in sigmas) and row["alp/sigma_mean"] == pytest.approx(sum(sigmas) / 4)
        assert row["alp/seq_ratio_mean"] > 0
    # AdamW moves each log-scale by about its learning rate per step: the trajectories leave sigma_0
    assert all(abs(rows[-1][f"alp/sigma_l{i}"] / 0.05 - 1) > 0.01 for i in range(4))
    assert load_latest_checkpoint(out)["alp"]["log_sigma_L"].shape == (4,)


def test_fixed_scales_stay_at_alp_std(tmp_path):
    rows = train(tmp_path, "fixed", **ALP, alp_learnable=False, steps=1)
    assert [row["alp/sigma_l2"] for row in rows] == [pytest.approx(0.05, rel=1e-6)]
    assert "alp" in load_latest_checkpoint(tmp_path / "fixed")  # the buffer, for a resume


def test_an_alp_run_on_some_layers_resumes_bitwise(tmp_path):
    layers = dict(ALP, alp_start=1, alp_end=3)
    train(tmp_path, "straight", **layers)
    rows = train(tmp_path, "resumed", **layers, steps=1)
    assert "alp/sigma_l0" not in rows[0] and {"alp/sigma_l1", "alp/sigma_l2"} <= set(rows[0])
    train(tmp_path, "resumed", **layers, resume=str(tmp_path / "resumed"))
    a, b = load_latest_checkpoint(tmp_path / "straight"), load_latest_checkpoint(tmp_path / "resumed")
    assert a["alp"]["log_sigma_L"].shape == (2,) and torch.equal(a["alp"]["log_sigma_L"], b["alp"]["log_sigma_L"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
