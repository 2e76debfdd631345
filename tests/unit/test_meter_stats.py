"""Meter statistics against slow references written with Python loops and NumPy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tether.meter.stats import (
    DEFAULT_THRESHOLDS,
    LENGTH_EDGES,
    POSITION_EDGES,
    PROB_EDGES,
    QUANTILES,
    bucket_label,
    ess_sequence,
    ess_token,
    profile_stats,
    ratio_stats,
)

pytestmark = pytest.mark.unit

RTOL = 1e-9


def _case(seed: int, B: int = 6, T: int = 11, scale: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, generator=g, dtype=torch.float64) * scale
    m = torch.rand(B, T, generator=g) > 0.3
    m[0] = False  # an empty row
    m[1] = False
    m[1, 3] = True  # a length-1 row
    z[2, 0], z[2, 1] = 50.0, -50.0  # extreme log-ratios
    m[2, 0] = m[2, 1] = True
    z[3, ~m[3]] = float("nan")  # garbage off the mask must not leak
    return z, m


def _valid_tokens(z, m):
    return [float(z[b, t]) for b in range(z.shape[0]) for t in range(z.shape[1]) if m[b, t]]


def _valid_rows(z, m):
    rows = []
    for b in range(z.shape[0]):
        vals = [float(z[b, t]) for t in range(z.shape[1]) if m[b, t]]
        if vals:
            rows.append(vals)
    return rows


def _ess_ref(logw):
    """(sum w)^2 / (n sum w^2), with w = exp(logw - max) to keep it finite."""
    if not logw:
        return 1.0
    top = max(logw)
    w = [math.exp(x - top) for x in logw]
    return sum(w) ** 2 / (len(w) * sum(x * x for x in w))


def _reference_stats(z, m, thresholds):
    toks = _valid_tokens(z, m)
    rows = _valid_rows(z, m)
    a = np.array(toks)
    seq = [sum(r) for r in rows]
    geo = [sum(r) / len(r) for r in rows]
    ref = {
        "n_tokens": len(toks),
        "n_seqs": len(rows),
        "ess_token": _ess_ref(toks),
        "ess_seq": _ess_ref(seq),
        "ess_geo": _ess_ref(geo),
        "logr_mean": a.mean(),
        "logr_std": a.std(),
        "abs_logr_mean": np.abs(a).mean(),
        "logr_min": a.min(),
        "logr_max": a.max(),
        "abs_logr_p99": np.quantile(np.abs(a), 0.99),
        "abs_logr_max": np.abs(a).max(),
        "kl_k1": np.mean([-x for x in toks]),
        "kl_k2": np.mean([0.5 * x * x for x in toks]),
        "kl_k3": np.mean([math.exp(x) - 1 - x for x in toks]),
        "chi2": np.mean([(math.exp(x) - 1) ** 2 for x in toks]),
        "seq_logr_p99": np.quantile(seq, 0.99),
        "seq_abs_logr_p50": np.quantile(np.abs(seq), 0.5),
        "seq_abs_logr_p99": np.quantile(np.abs(seq), 0.99),
        "geo_abs_logr_p50": np.quantile(np.abs(geo), 0.5),
        "geo_abs_logr_p99": np.quantile(np.abs(geo), 0.99),
    }
    ref["ppl_ratio"] = math.exp(ref["kl_k1"])
    for name, q in QUANTILES:
        ref[f"logr_{name}"] = np.quantile(a, q)
    for tau in thresholds:
        ref[f"tail_gt_{tau:g}"] = np.mean([abs(x) > tau for x in toks])
    return ref


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ratio_stats_match_loop_reference(seed):
    z, m = _case(seed)
    got = ratio_stats(z, m, prefix="meter/x", thresholds=DEFAULT_THRESHOLDS)
    ref = _reference_stats(z, m, DEFAULT_THRESHOLDS)
    assert set(got) == {f"meter/x/{k}" for k in ref}
    for k, v in ref.items():
        g = got[f"meter/x/{k}"]
        assert g.dtype == torch.float64 and g.dim() == 0 and not g.requires_grad
        np.testing.assert_allclose(float(g), v, rtol=RTOL, atol=1e-12, err_msg=k)


def test_ess_is_one_without_mismatch_and_small_with_one_dominant_weight():
    m = torch.ones(3, 5, dtype=torch.bool)
    assert float(ess_token(torch.zeros(3, 5), m)) == pytest.approx(1.0, rel=1e-12)
    z = torch.zeros(3, 5, dtype=torch.float64)
    z[0, 0] = 40.0  # one weight dominates: ESS -> 1/n
    assert float(ess_token(z, m)) == pytest.approx(1 / 15, rel=1e-9)
    assert float(ess_sequence(z, m)) == pytest.approx(1 / 3, rel=1e-9)
    # geometric mean: row 0 has mean log-ratio 8, still dominant
    assert float(ess_sequence(z, m, geometric=True)) == pytest.approx(_ess_ref([8.0, 0.0, 0.0]), rel=1e-12)


def test_empty_mask_gives_documented_neutral_values():
    z = torch.randn(3, 4, dtype=torch.float64)
    got = ratio_stats(z, torch.zeros(3, 4, dtype=torch.bool), prefix="p")
    for k, v in got.items():
        assert torch.isfinite(v), k
        expected = 1.0 if k.split("/")[-1] in {"ess_token", "ess_seq", "ess_geo", "ppl_ratio"} else 0.0
        assert float(v) == expected, k
    # a zero-size batch too
    got = ratio_stats(torch.zeros(0, 0), torch.zeros(0, 0, dtype=torch.bool), prefix="p")
    assert float(got["p/ess_token"]) == 1.0 and float(got["p/logr_p99"]) == 0.0


def test_float32_input_is_measured_in_float64():
    z, m = _case(4)
    z32 = torch.nan_to_num(z).float()
    got = ratio_stats(z32, m, prefix="p")
    ref = _reference_stats(z32.double(), m, DEFAULT_THRESHOLDS)
    np.testing.assert_allclose(float(got["p/chi2"]), ref["chi2"], rtol=RTOL)


def _bucket(x, edges):
    k = 0
    for i, e in enumerate(edges):
        if x >= e:
            k = i
    return k


def test_profiles_match_loop_reference():
    z, m = _case(7, B=8, T=40)
    g = torch.Generator().manual_seed(3)
    logp = torch.log(torch.rand(8, 40, generator=g, dtype=torch.float64))
    ent = torch.rand(8, 40, generator=g, dtype=torch.float64) * 5
    got = profile_stats(z, m, prefix="p", logp_BT=logp, entropy_BT=ent)
    from tether.meter.stats import ENTROPY_EDGES

    for group, edges, key_of in [
        ("by_pos", POSITION_EDGES, None),
        ("by_prob", PROB_EDGES, lambda b, t: math.exp(float(logp[b, t]))),
        ("by_entropy", ENTROPY_EDGES, lambda b, t: float(ent[b, t])),
    ]:
        buckets = {k: [] for k in range(len(edges))}
        for b in range(z.shape[0]):
            pos = 0
            for t in range(z.shape[1]):
                if m[b, t]:
                    key = pos if key_of is None else key_of(b, t)
                    buckets[_bucket(key, edges)].append(float(z[b, t]))
                    pos += 1
        for k, vals in buckets.items():
            pre = f"p/{group}/{bucket_label(edges, k)}"
            assert float(got[f"{pre}/n"]) == len(vals)
            if vals:
                np.testing.assert_allclose(float(got[f"{pre}/abs_logr_mean"]), np.mean(np.abs(vals)), rtol=RTOL)
                np.testing.assert_allclose(float(got[f"{pre}/logr_mean"]), np.mean(vals), rtol=RTOL)
                np.testing.assert_allclose(
                    float(got[f"{pre}/kl_k3"]), np.mean([math.exp(v) - 1 - v for v in vals]), rtol=RTOL
                )
            else:
                assert math.isnan(float(got[f"{pre}/abs_logr_mean"]))
    rows = {k: [] for k in range(len(LENGTH_EDGES))}
    for b in range(z.shape[0]):
        vals = [float(z[b, t]) for t in range(z.shape[1]) if m[b, t]]
        if vals:
            rows[_bucket(len(vals), LENGTH_EDGES)].append(vals)
    for k, rs in rows.items():
        pre = f"p/by_len/{bucket_label(LENGTH_EDGES, k)}"
        assert float(got[f"{pre}/n"]) == len(rs)
        if rs:
            np.testing.assert_allclose(float(got[f"{pre}/ess_seq"]), _ess_ref([sum(r) for r in rs]), rtol=RTOL)
            np.testing.assert_allclose(
                float(got[f"{pre}/ess_geo"]), _ess_ref([sum(r) / len(r) for r in rs]), rtol=RTOL
            )
        else:
            assert math.isnan(float(got[f"{pre}/ess_seq"]))


def test_bucket_labels():
    assert bucket_label((0, 4, 8), 0) == "0-4"
    assert bucket_label((0, 4, 8), 2) == "8-inf"
    assert bucket_label(PROB_EDGES, len(PROB_EDGES) - 1) == "0.99-inf"
