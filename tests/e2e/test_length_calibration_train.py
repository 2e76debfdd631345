"""Issue 17 item 3: length-calibrated sequence thresholds are reachable from `tether train` for tis, mis and icepop,
and a run uses them: it logs the range of the per-row calibrated log bound (a metric only the option emits), and
each logged value is the rule's bound at some response length the run can produce (1..max_new_tokens)."""

import math

import pytest

from tests.e2e.test_corrections_reachable import TINY, cli
from tests.e2e.test_train_flags import varied_reward
from tether.train import sync
from tether.train.config import TrainConfig
from tether.train.metrics_log import read_metrics

pytestmark = pytest.mark.e2e
T0 = 3.0


def rule_bounds(log_b0: float, rule: str, drift: float = 0.0) -> list[float]:
    """The calibrated log bound at every length 1..max_new_tokens (the module's equations)."""
    out = []
    for T in range(1, TINY["max_new_tokens"] + 1):
        if rule == "geo":
            out.append(T / T0 * log_b0)
        else:
            out.append(drift * T + math.sqrt(T / T0) * (log_b0 - drift * T0))
    return out


def check_on_grid(rows, key, grid):
    for r in rows:
        lo, hi = r[f"{key}_min"], r[f"{key}_max"]
        assert lo <= hi
        for v in (lo, hi):
            assert min(abs(v - g) for g in grid) < 1e-5, (key, v, grid)
    assert any(r[f"{key}_max"] > r[f"{key}_min"] for r in rows), "every row had the same length"


@pytest.mark.parametrize("objective,args,key,log_b0", [
    ("tis", {"level": "sequence", "length_calibration": "sqrt", "ref_len": T0}, "tis/calib_log_cap", math.log(2.0)),
    ("icepop", {"level": "sequence", "length_calibration": "sqrt", "ref_len": T0, "length_drift": -0.01},
     "icepop/calib_log_high", math.log(5.0)),
])
def test_calibrated_presets_log_their_bounds_in_a_run(tmp_path, objective, args, key, log_b0):
    cfg = TrainConfig.from_flat(out=str(tmp_path / objective), objective=objective, objective_args=args,
                                rollout_precision="int8", **TINY, **varied_reward(tmp_path))
    sync.train(cfg)
    rows = read_metrics(tmp_path / objective / "metrics.jsonl")
    assert len(rows) == 2
    check_on_grid(rows, key, rule_bounds(log_b0, "sqrt", args.get("length_drift", 0.0)))


def test_mis_geo_calibration_from_the_cli(tmp_path):
    """`--objective-args` with the geo rule: both sides of mis's band move linearly with the row's length."""
    rows, config = cli(tmp_path, "mis", "--objective", "mis", "--rollout-precision", "int8", "--objective-args",
                       f'{{"length_calibration": "geo", "ref_len": {T0}}}')
    assert config["objective_args"] == {"length_calibration": "geo", "ref_len": T0}
    check_on_grid(rows, "mis/calib_log_high", rule_bounds(math.log(2.0), "geo"))
    check_on_grid(rows, "mis/calib_log_low", rule_bounds(math.log(0.5), "geo"))


def test_a_bad_calibration_is_refused_before_the_run(tmp_path):
    with pytest.raises(ValueError, match="objective 'tis': length_calibration 'geo' needs level 'sequence'"):
        sync.train(TrainConfig.from_flat(out=str(tmp_path / "bad"), objective="tis",
                                         objective_args={"length_calibration": "geo", "ref_len": 4}, **TINY))
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()
