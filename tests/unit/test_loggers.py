"""Trackers write their own files under the run directory: TensorBoard events, W&B offline runs,
a local MLflow store; metrics.jsonl always. Each test skips when its package is absent."""

from __future__ import annotations

import pytest

from tether.train.config import TrainConfig
from tether.train.loggers import open_loggers
from tether.train.metrics_log import MetricsLog, read_metrics

pytestmark = pytest.mark.unit

RECORDS = [{"step": 0, "reward/mean": 0.25, "loss": 1.5, "alarm/text": "x", "nan": float("nan")},
           {"step": 1, "reward/mean": 0.75, "loss": 0.5}]


def _log(tmp_path, **flags):
    loggers = open_loggers(TrainConfig.from_flat(**flags), tmp_path, MetricsLog(tmp_path / "metrics.jsonl"))
    for r in RECORDS:
        loggers.write(r)
    loggers.close()
    assert [r["reward/mean"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0.25, 0.75]
    return loggers


def test_metrics_jsonl_only_by_default(tmp_path):
    assert _log(tmp_path).trackers == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_tensorboard_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _log(tmp_path, tensorboard=True)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("reward/mean")] == [(0, 0.25), (1, 0.75)]
    assert "nan" not in acc.Tags()["scalars"] and "alarm/text" not in acc.Tags()["scalars"]


def test_wandb_offline_writes_a_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    _log(tmp_path, wandb=True)
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_mlflow_local_store_has_the_metrics(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    loggers = _log(tmp_path, mlflow=True)
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    history = client.get_metric_history(loggers.trackers[0].run_id, "reward.mean")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.25), (1, 0.75)]
    assert client.get_run(loggers.trackers[0].run_id).data.params["lr"] == str(TrainConfig.from_flat().lr)


def test_missing_package_names_flag_and_extra(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r"'wandb' needs the wandb package: pip install 'tether\[wandb\]'"):
        open_loggers(TrainConfig.from_flat(wandb=True), tmp_path, MetricsLog(tmp_path / "metrics.jsonl"))
