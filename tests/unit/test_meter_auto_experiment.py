"""The chain experiment behind the auto rule (benchmarks/meter_auto_rule.py) checks its own maths."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "meter_auto_rule.py"
_spec = importlib.util.spec_from_file_location("meter_auto_rule", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_untruncated_sequence_is_is_exactly_unbiased_and_token_is_is_not():
    r = bench.evaluate(3, 4, 0.6, 64, seed=2)
    assert r["rel_bias2"]["seq(inf)"] < 1e-20  # importance sampling with the full product ratio is exact
    assert r["rel_bias2"]["token(5)"] > 1e-4  # the per-token ratio ignores the prefix shift
    assert r["rel_bias2"]["none"] > r["rel_bias2"]["token(5)"]


def test_no_mismatch_means_no_bias_and_identical_estimators():
    r = bench.evaluate(3, 3, 0.0, 64, seed=0)
    assert r["ess_seq"] == pytest.approx(1.0) and r["ess_token"] == pytest.approx(1.0)
    values = list(r["rel_mse"].values())
    assert max(values) == pytest.approx(min(values), rel=1e-9)
    assert all(b < 1e-20 for b in r["rel_bias2"].values())


def test_variance_shrinks_as_one_over_n():
    a, b = bench.evaluate(3, 4, 0.3, 64, seed=1), bench.evaluate(3, 4, 0.3, 640, seed=1)
    var_a = a["rel_mse"]["seq(inf)"] - a["rel_bias2"]["seq(inf)"]
    var_b = b["rel_mse"]["seq(inf)"] - b["rel_bias2"]["seq(inf)"]
    assert var_a / var_b == pytest.approx(10.0, rel=1e-9)
