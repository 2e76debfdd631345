"""Issue 17 item 2: the rejection masks, the advantage override and the importance-corrected KL are reachable from
`tether train`, and a run uses them: each emits a metric only it produces, with the value its maths implies."""

import json
from pathlib import Path

import pytest

from tests.e2e.test_train_flags import varied_reward
from tests.processes import run as run_child
from tests.processes import tether_command, tether_env
from tether.train import sync
from tether.train.config import TrainConfig
from tether.train.metrics_log import read_metrics

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
TINY = dict(steps=2, prompts_per_step=4, group_size=4, max_new_tokens=6, warmstart_steps=30, eval_size=10,
            threads=1, progress=False, seed=1, plots=False)


@pytest.mark.parametrize("objective,args,metric", [
    ("rejection", {"high": 1e-9}, "rejection/maskfrac"),  # k3 seq-mean above 1e-9: int8 noise rejects rows
    ("opsm", {"delta": -1.0}, "opsm/maskfrac"),  # every negative-advantage sequence is dropped
    ("roll_infer", {"token_reject": [0.9999, 1.0001]}, "infer/rejectfrac"),
])
def test_rejection_presets_drop_tokens_in_a_run(tmp_path, objective, args, metric):
    cfg = TrainConfig.from_flat(out=str(tmp_path / objective), objective=objective, objective_args=args,
                                rollout_precision="int8", **TINY, **varied_reward(tmp_path))
    sync.train(cfg)
    rows = read_metrics(tmp_path / objective / "metrics.jsonl")
    assert len(rows) == 2
    assert all(metric in r for r in rows)
    assert max(r[metric] for r in rows) > 0  # the mask dropped loss tokens


def cli(tmp_path, name, *flags):
    out = tmp_path / name
    data = {**TINY, **varied_reward(tmp_path)}
    args = [f"--{k.replace('_', '-')}={v}" for k, v in data.items() if k not in ("progress", "plots")]
    proc = run_child(tether_command("train", "--classic", *args, "--no-progress", "--no-plots", "--out", str(out),
                                    *flags), env=tether_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_metrics(out / "metrics.jsonl"), json.loads((out / "config.json").read_text())


def test_advantage_override_and_importance_corrected_kl_from_the_cli(tmp_path):
    """`--advantage reinforce_pp` whitens over the batch (std 1 whenever rewards differ; GRPO's group std over
    a batch of equal groups is below 1), and `--kl-estimator k3_is` adds (pi_theta/mu) k3 to the loss, logging
    the mean of pi_theta/mu (int8 rollouts, so it is not 1)."""
    rows, config = cli(tmp_path, "rpp", "--advantage", "reinforce_pp", "--kl-placement", "loss", "--kl-coef", "0.1",
                       "--kl-estimator", "k3_is", "--rollout-precision", "int8")
    assert config["advantage"] == "reinforce_pp"
    varied = [r for r in rows if r["advantage/std"] > 0]
    assert varied, "no step had differing rewards"
    for r in varied:
        assert r["advantage/std"] == pytest.approx(1.0, abs=1e-4)
        assert r["advantage/mean"] == pytest.approx(0.0, abs=1e-6)
    assert all("kl/is_weight_mean" in r and "kl/loss" in r for r in rows)
    assert any(abs(r["kl/is_weight_mean"] - 1.0) > 1e-6 for r in rows)
    base, _ = cli(tmp_path, "grpo", "--kl-placement", "loss", "--kl-coef", "0.1")
    assert all("kl/is_weight_mean" not in r for r in base)
    assert any(0 < r["advantage/std"] < 0.99 for r in base)


def test_k3_is_in_the_reward_is_refused_at_the_edge():
    with pytest.raises(ValueError, match="kl_estimator' k3_is needs kl_placement 'loss'"):
        TrainConfig.from_flat(kl_placement="reward", kl_coef=0.1, kl_estimator="k3_is")
    with pytest.raises(ValueError, match="config field 'advantage' must be one of grpo"):
        TrainConfig.from_flat(advantage="gae")
