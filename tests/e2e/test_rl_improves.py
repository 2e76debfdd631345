"""The proof: RL with the default job's settings raises held-out accuracy (it can fail: it measures). The
default job (docs/default_job.md) trains through a real mismatch: async one version ahead, an int8 engine, TIS.

It runs a fixed number of steps and decides nothing by the clock, so a slow machine only makes it
slower; HEAVY_TIMEOUT_S is the safety net for a hang (docs/testing.md)."""

import json

import pytest

from tests.limits import HEAVY_TIMEOUT_S
from tether.train.async_loop import train
from tether.train.config import TrainConfig

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(HEAVY_TIMEOUT_S)]


def test_the_default_job_raises_heldout_accuracy(tmp_path):
    cfg = TrainConfig.default(out=str(tmp_path / "run"), progress=False, threads=2, seed=0)
    assert cfg.mode.value == "async" and cfg.objective == "tis"
    summary = train(cfg)
    before, after = summary["eval/accuracy_before"], summary["eval/accuracy_after"]
    assert 0.05 < before < 0.9, f"the warm start should leave room for RL, got {before}"
    assert after > before + 0.03, f"held-out accuracy {before:.3f} -> {after:.3f}"
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["eval/accuracy_after"] == after
    for png in ("reward.png", "mismatch.png"):
        assert (tmp_path / "run" / png).stat().st_size > 1000
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == cfg.steps
    for key in ("step", "reward/mean", "loss", "time/step_s", "pg/clipfrac", "meter/total/ess_token",
                "meter/decomp/engine/var_share", "tis/weight_mean"):
        assert key in rows[-1], key
