"""Calibration metrics vs loop references; CaOPD's empirical-confidence target."""

from __future__ import annotations

import pytest
import torch

from tether.distill.calibration import (
    brier_score,
    empirical_confidence,
    expected_calibration_error,
    overconfidence_gap,
    with_confidence,
)


def _loop_ece(c, a, n_bins):
    total = 0.0
    for k in range(n_bins):
        lo, hi = k / n_bins, (k + 1) / n_bins
        idx = [i for i, x in enumerate(c) if (lo <= x < hi) or (k == n_bins - 1 and x == 1.0)]
        if idx:
            total += len(idx) / len(c) * abs(sum(a[i] for i in idx) / len(idx) - sum(c[i] for i in idx) / len(idx))
    return total


@pytest.mark.parametrize("n_bins", [1, 5, 10])
def test_ece_matches_loop(n_bins):
    g = torch.Generator().manual_seed(0)
    c = torch.rand(200, generator=g, dtype=torch.float64)
    c[:3] = torch.tensor([0.0, 1.0, 0.5])
    a = (torch.rand(200, generator=g) < c).to(torch.float64)
    got = expected_calibration_error(c, a, n_bins=n_bins)
    assert got.item() == pytest.approx(_loop_ece(c.tolist(), a.tolist(), n_bins), rel=1e-12, abs=1e-15)


def test_perfectly_overconfident_model():
    c = torch.ones(10)
    a = torch.tensor([1.0] * 3 + [0.0] * 7)
    assert expected_calibration_error(c, a).item() == pytest.approx(0.7)
    assert overconfidence_gap(c, a).item() == pytest.approx(0.7)
    assert brier_score(c, a).item() == pytest.approx(0.7)


def test_empirical_confidence_per_group_and_target_text():
    correct = torch.tensor([1, 0, 0, 0, 1, 1, 1, 0])
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    torch.testing.assert_close(empirical_confidence(correct, group),
                               torch.tensor([0.25] * 4 + [0.75] * 4, dtype=torch.float64))
    assert with_confidence("19\nConfidence: 0.99", 0.25) == "19\nConfidence: 0.25"
    assert with_confidence("19", 1.0) == "19\nConfidence: 1.00"


def test_stated_confidence_and_short_label():
    from tether.distill.caopd import stated_confidence

    assert stated_confidence("19\nConfidence: 0.25") == 0.25
    assert stated_confidence("19\nc0.5", "c") == 0.5
    assert stated_confidence("19") == 1.0  # no statement: the answer is asserted outright
    assert stated_confidence("19\nConfidence: 7") == 1.0  # clipped to [0, 1]
    assert with_confidence("19\nc0.99", 0.5, label="c") == "19\nc0.50"
