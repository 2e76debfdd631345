"""Where a run's per-step metrics go: ``metrics.jsonl`` always, plus optional trackers.

Each tracker is behind a ``TrainConfig`` flag and a package extra, writes under the run directory
and never needs a network:

* ``--tensorboard``: event files in ``RUN/tensorboard`` (``torch.utils.tensorboard``; extra ``tensorboard``);
* ``--wandb``: a Weights & Biases run in offline mode in ``RUN/wandb`` (``wandb sync`` uploads it
  later; extra ``wandb``);
* ``--mlflow``: a local MLflow file store in ``RUN/mlruns``, experiment ``tether`` (``mlflow ui
  --backend-store-uri RUN/mlruns``; extra ``mlflow``).

Only finite numeric metrics go to trackers (metrics.jsonl keeps everything). A missing package is a
``ValueError`` naming the flag and the install command, raised before training starts.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in record.items():
        if hasattr(v, "item") and getattr(v, "numel", lambda: 1)() == 1:
            v = v.item()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = float(v)
    return out


def _require(module: str, flag: str, extra: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ValueError(f"config field '{flag}' needs the {module} package: pip install 'tether[{extra}]'")


class TensorBoardLogger:
    def __init__(self, run_dir: Path, config: dict) -> None:
        _require("tensorboard", "tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k} = {v!r}" for k, v in config.items()))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    def __init__(self, run_dir: Path, config: dict) -> None:
        _require("wandb", "wandb", "wandb")
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(project="tether", name=run_dir.name, dir=str(run_dir), mode="offline", config=config,
                              reinit="finish_previous")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowLogger:
    def __init__(self, run_dir: Path, config: dict) -> None:
        _require("mlflow", "mlflow", "mlflow")
        from mlflow.tracking import MlflowClient

        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow >= 3.x: the file store is opt-in
        self.client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
        exp = self.client.get_experiment_by_name("tether")
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment("tether")
        self.run_id = self.client.create_run(exp_id, run_name=run_dir.name).info.run_id
        for k, v in config.items():
            self.client.log_param(self.run_id, k, str(v)[:500])

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k.replace("/", "."), v, now, step) for k, v in scalars.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


HEADLINE = {"reward/mean": "headline/reward", "loss": "headline/loss",
            "meter/total/ess_token": "headline/ess_token", "mismatch/abs_logp_diff_mean": "headline/abs_dlogp",
            "perf/tokens_per_s": "headline/tokens_per_s"}
"""The few curves a tracker shows first (under ``headline/``), beside the full set of metrics."""


def headline(scalars: dict[str, float]) -> dict[str, float]:
    """The headline copies of the metrics present in ``scalars``."""
    return {HEADLINE[k]: v for k, v in scalars.items() if k in HEADLINE}


class RunLoggers:
    """``write(record)`` goes to metrics.jsonl and to every enabled tracker (with the ``headline/`` curves);
    ``eval_point(updates, accuracy)`` gives the trackers the held-out accuracy after that many updates (0: before
    training; the before / after values have no metrics.jsonl row of their own, summary.json has them; a
    mid-run one is also in its step's row); ``close()`` at the end."""

    def __init__(self, metrics_log, trackers: list) -> None:
        self.metrics_log, self.trackers = metrics_log, trackers

    def write(self, record: dict[str, Any]) -> None:
        self.metrics_log.write(record)
        if self.trackers:
            scalars = _scalars(record)
            scalars.pop("eval/accuracy", None)  # trackers get it from eval_point, at the number of updates done
            self._log(int(record.get("step", 0)), {**scalars, **headline(scalars)})

    def eval_point(self, step: int, accuracy: float) -> None:
        if self.trackers and math.isfinite(accuracy):
            self._log(step, {"eval/accuracy": accuracy, "headline/accuracy": accuracy})

    def _log(self, step: int, scalars: dict[str, float]) -> None:
        for t in self.trackers:
            t.log(step, scalars)

    def close(self) -> None:
        for t in self.trackers:
            t.close()


def open_loggers(cfg, run_dir: str | Path, metrics_log) -> RunLoggers:
    from tether.configs import to_dict

    run_dir = Path(run_dir)
    config = to_dict(cfg)
    chosen = [(getattr(cfg, "tensorboard", False), TensorBoardLogger), (getattr(cfg, "wandb", False), WandbLogger),
              (getattr(cfg, "mlflow", False), MlflowLogger)]
    return RunLoggers(metrics_log, [cls(run_dir, config) for on, cls in chosen if on])
