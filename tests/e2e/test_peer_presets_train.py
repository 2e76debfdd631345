"""Issue 17 item 1: `tether train --objective NAME` runs each preset ported from verl / TRL for two tiny steps, and
the run uses it: every step logs the metric only that preset emits, with a value its maths allows. The runs go
through the Python entry point (`TrainConfig.from_flat` + `sync.train`, what the CLI calls after parsing; one
preset also through the command line) to keep the suite fast."""

import json
import math
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
            threads=1, seed=1)
METRIC = {  # preset -> (its own metric, the range the value must lie in)
    "sapo": ("sapo/gate_mean", (0.0, 4.0 / 1.0)),
    "vespo": ("vespo/phi_mean", (0.0, 1.0 + 1e-9)),  # phi <= phi(1) = 1 for these (k, lam)
    "geo_mean": ("gmpo/seq_ratio_mean", (0.0, math.inf)),
    "luspo": ("luspo/seq_ratio_mean", (0.0, math.inf)),
    "clip_cov": ("clip_cov/selected_frac", (0.0, 1.0)),
    "kl_cov": ("kl_cov/selected_frac", (1e-12, 1.0)),  # at least one token of the step is selected
}


def train(tmp_path, name, *, cli: bool) -> Path:
    out = tmp_path / name
    settings = {**TINY, **varied_reward(tmp_path)}
    if cli:
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
        proc = run_child(tether_command("train", "--objective", name, *flags, "--no-progress", "--no-plots", "--out", str(out)),
                         env=tether_env())
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        sync.train(TrainConfig.from_flat(objective=name, out=str(out), progress=False, plots=False, **settings))
    return out


@pytest.mark.parametrize("name", sorted(METRIC))
def test_tether_train_runs_the_new_preset(tmp_path, name):
    out = train(tmp_path, name, cli=name == "clip_cov")
    assert json.loads((out / "config.json").read_text())["objective"] == name
    rows = read_metrics(out / "metrics.jsonl")
    assert len(rows) == 2
    key, (lo, hi) = METRIC[name]
    for r in rows:
        assert math.isfinite(r["loss"]) and r["grad_norm"] > 0
        assert lo <= r[key] <= hi, (key, r[key])
