"""Issue 16 item 4: the post-sync probe's alarm acts through the mismatch budget. An int8 rollout worker scores
the probe batch differently from the fp32 trainer, so a 1e-4 threshold fires: with ``budget_action = lower_lr``
every step's learning rate is halved, with ``stop`` the run stops before its first update naming the metric;
an fp32 worker (difference 0 on CPU) raises nothing. One worker in the trainer's process (no Ray)."""

import json

import pytest

from tests.dist.scenario import SMALL, digit_share
from tether.dist import driver
from tether.train import setup
from tether.train.run import Run
from tether.train.config import TrainConfig
from tether.train.errors import TrainingStopped

pytestmark = pytest.mark.e2e
pytest.importorskip("safetensors")

TINY = dict(SMALL, steps=2, prompts_per_step=2, group_size=2, max_new_tokens=4, eval_size=2, probe_prompts=1,
            rollout_workers=0, probe_max_logp_diff=1e-4, checkpoint_every=1, device="cpu")


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(autouse=True)
def _digits(monkeypatch):
    monkeypatch.setattr(Run, "score", digit_share)


def test_an_int8_worker_lowers_the_lr_through_the_budget_and_an_fp32_one_does_not(tmp_path):
    driver.train(TrainConfig.from_flat(**TINY, rollout_precision="int8", budget_action="lower_lr",
                                       out=str(tmp_path / "int8")))
    rows = _rows(tmp_path / "int8")
    assert all(r["sync/probe_max_abs_logp_diff"] > 1e-4 for r in rows)
    assert [r["budget/alarm/probe_max_logp_diff"] for r in rows] == [1, 1]
    assert [r["budget/lr_scale"] for r in rows] == [0.5, 0.25]
    assert [r["lr"] for r in rows] == pytest.approx([5e-4, 2.5e-4])
    summary = json.loads((tmp_path / "int8" / "summary.json").read_text())
    assert summary["count/budget_alarm_steps"] == 2
    driver.train(TrainConfig.from_flat(**TINY, budget_action="lower_lr", out=str(tmp_path / "fp32")))
    rows = _rows(tmp_path / "fp32")
    assert [r["sync/probe_max_abs_logp_diff"] for r in rows] == [0.0, 0.0]
    assert [r["budget/alarms"] for r in rows] == [0, 0] and [r["lr"] for r in rows] == [1e-3, 1e-3]


def test_an_int8_worker_stops_the_run_before_its_first_update(tmp_path):
    with pytest.raises(TrainingStopped, match=r"step 0: mismatch budget exceeded: sync/probe_max_abs_logp_diff = "
                                              r"\S+ > 0.0001 \(DistConfig.probe_max_logp_diff\); action: stop"):
        driver.train(TrainConfig.from_flat(**TINY, rollout_precision="int8", budget_action="stop",
                                           out=str(tmp_path / "stop")))
    (row,) = _rows(tmp_path / "stop")
    assert row["budget/stopped"] == 1 and row["budget/alarm/probe_max_logp_diff"] == 1 and row["step"] == 0
    assert not (tmp_path / "stop" / "checkpoints" / "step_000001").exists()
