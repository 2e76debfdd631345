"""measure(): which ratios exist for which inputs; decomposition parts sum to the total."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tether.meter import decompose, decompose_log_ratio, measure, to_floats
from tether.meter.stats import ratio_stats

pytestmark = pytest.mark.unit


def _batch(seed=0, B=5, T=12, engine=0.05, stale=0.2, drift=0.01):
    g = torch.Generator().manual_seed(seed)
    mu = torch.log(torch.rand(B, T, generator=g, dtype=torch.float64))
    behave = mu + engine * torch.randn(B, T, generator=g, dtype=torch.float64)
    old = behave + stale * torch.randn(B, T, generator=g, dtype=torch.float64)
    theta = old + drift * torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[0] = False
    return theta, old, mu, behave, mask


def test_all_ratios_with_all_inputs_and_each_equals_ratio_stats_of_its_log_ratio():
    theta, old, mu, behave, mask = _batch()
    got = measure(mask_BT=mask, logp_theta_BT=theta, logp_old_BT=old, logp_mu_BT=mu, logp_behave_old_BT=behave)
    for name, z in {"engine": behave - mu, "staleness": old - behave, "drift": theta - old, "total": theta - mu}.items():
        ref = ratio_stats(z, mask, prefix=f"meter/{name}")
        for k, v in ref.items():
            assert float(got[k]) == pytest.approx(float(v), rel=1e-12, abs=1e-15), k
    assert "meter/decomp/unavailable" not in got


def test_total_falls_back_to_pi_old_over_mu_without_theta():
    _, old, mu, _, mask = _batch(1)
    got = measure(mask_BT=mask, logp_old_BT=old, logp_mu_BT=mu)
    assert not any(k.startswith("meter/drift/") or k.startswith("meter/staleness/") for k in got)
    ref = ratio_stats(old - mu, mask, prefix="meter/total")
    assert float(got["meter/total/kl_k3"]) == pytest.approx(float(ref["meter/total/kl_k3"]), rel=1e-12)
    # no versions: every token counts as fresh, engine == total
    assert float(got["meter/engine/kl_k3"]) == pytest.approx(float(ref["meter/total/kl_k3"]), rel=1e-12)


def test_engine_keeps_only_fresh_tokens_without_behaviour_logprobs():
    _, old, mu, _, mask = _batch(2)
    version = torch.full(mask.shape, 7)
    version[:2] = 5  # rows 0-1 are stale
    got = measure(mask_BT=mask, logp_old_BT=old, logp_mu_BT=mu, version_BT=version, current_version=7)
    fresh = mask.clone()
    fresh[:2] = False
    ref = ratio_stats(old - mu, fresh, prefix="meter/engine")
    assert float(got["meter/engine/n_tokens"]) == float(fresh.sum())
    assert float(got["meter/engine/logr_p99"]) == pytest.approx(float(ref["meter/engine/logr_p99"]), rel=1e-12)
    assert float(got["meter/total/n_tokens"]) == float(mask.sum())
    assert "older version" in got["meter/decomp/unavailable"]
    assert float(got["meter/version/stale_frac"]) == pytest.approx(float(mask[:2].sum() / mask.sum()))
    assert float(got["meter/version/age_max"]) == 2.0


def test_decomposition_parts_sum_to_the_total_and_shares_to_one():
    _, old, mu, behave, mask = _batch(3)
    d = decompose(logp_old_BT=old, logp_mu_BT=mu, logp_behave_old_BT=behave, mask_BT=mask)
    assert d.unavailable is None
    f = to_floats(d.metrics)
    p = "meter/decomp"
    assert f[f"{p}/engine/kl_k1"] + f[f"{p}/staleness/kl_k1"] == pytest.approx(f[f"{p}/total/kl_k1"], rel=1e-12)
    assert f[f"{p}/engine/var"] + f[f"{p}/staleness/var"] + f[f"{p}/cross/var"] == pytest.approx(
        f[f"{p}/total/var"], rel=1e-12
    )
    assert f[f"{p}/engine/var_share"] + f[f"{p}/staleness/var_share"] + f[f"{p}/cross/var_share"] == pytest.approx(1.0)
    assert f[f"{p}/engine/kl_k1_share"] + f[f"{p}/staleness/kl_k1_share"] == pytest.approx(1.0)
    # against a loop reference
    e = [float(behave[b, t] - mu[b, t]) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]
    s = [float(old[b, t] - behave[b, t]) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]
    ztot = [float(old[b, t] - mu[b, t]) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]
    np.testing.assert_allclose(f[f"{p}/total/var"], np.var(ztot), rtol=1e-9)
    np.testing.assert_allclose(f[f"{p}/engine/var"], np.var(e), rtol=1e-9)
    np.testing.assert_allclose(f[f"{p}/cross/var"], 2 * np.cov(e, s, bias=True)[0, 1], rtol=1e-9)
    np.testing.assert_allclose(f[f"{p}/engine/kl_k1"], -np.mean(e), rtol=1e-9)
    # staleness dominates in this batch (sd 0.2 vs 0.05)
    assert f[f"{p}/staleness/var_share"] > 0.8


def test_decomposition_empty_mask_is_defined():
    _, old, mu, behave, mask = _batch(4)
    f = to_floats(decompose_log_ratio(behave - mu, old - behave, torch.zeros_like(mask)))
    assert all(math.isfinite(v) and v == 0.0 for v in f.values())


def test_decomposition_unavailable_says_why():
    _, old, mu, _, mask = _batch(5)
    assert "logp_mu_BT" in decompose(logp_old_BT=old, logp_mu_BT=None, logp_behave_old_BT=None, mask_BT=mask).unavailable
    assert "logp_old_BT" in decompose(logp_old_BT=None, logp_mu_BT=mu, logp_behave_old_BT=None, mask_BT=mask).unavailable
    d = decompose(logp_old_BT=old, logp_mu_BT=mu, logp_behave_old_BT=None, mask_BT=mask)
    assert d.metrics == {} and "logp_behave_old_BT" in d.unavailable
    # all tokens fresh: staleness is exactly 0 and the engine part is the whole total
    fresh = decompose(
        logp_old_BT=old, logp_mu_BT=mu, logp_behave_old_BT=None, mask_BT=mask,
        version_BT=torch.full(mask.shape, 3), current_version=3,
    )
    assert fresh.unavailable is None
    f = to_floats(fresh.metrics)
    assert f["meter/decomp/engine/var_share"] == pytest.approx(1.0) and f["meter/decomp/staleness/var"] == 0.0


def test_correction_metrics_pass_through_and_shape_errors():
    _, old, mu, _, mask = _batch(6)
    got = measure(
        mask_BT=mask, logp_old_BT=old, logp_mu_BT=mu,
        objective_metrics={"pg/clipfrac": torch.tensor(0.25), "tis/mask_frac": 0.5, "loss": torch.tensor(3.0)},
        profiles=False,
    )
    assert float(got["meter/correction/pg/clipfrac"]) == 0.25
    assert float(got["meter/correction/tis/mask_frac"]) == 0.5
    assert "meter/correction/loss" not in got
    assert not any("/by_pos/" in k for k in got)
    with pytest.raises(ValueError, match="logp_mu_BT has shape"):
        measure(mask_BT=mask, logp_old_BT=old, logp_mu_BT=mu[:, :3])
    with pytest.raises(ValueError, match="current_version"):
        measure(mask_BT=mask, logp_old_BT=old, logp_mu_BT=mu, version_BT=torch.zeros(mask.shape))


def test_measure_does_not_track_gradients():
    theta, old, mu, _, mask = _batch(7)
    theta = theta.clone().requires_grad_(True)
    got = measure(mask_BT=mask, logp_theta_BT=theta, logp_old_BT=old, logp_mu_BT=mu)
    assert all(not v.requires_grad for v in got.values() if isinstance(v, torch.Tensor))


def test_fully_masked_batch_is_defined_everywhere():
    theta, old, mu, behave, mask = _batch(8)
    none = torch.zeros_like(mask)
    got = to_floats(measure(mask_BT=none, logp_theta_BT=theta, logp_old_BT=old, logp_mu_BT=mu,
                            logp_behave_old_BT=behave, entropy_BT=torch.ones_like(mu)))
    for k, v in got.items():
        bucket = "/by_" in k
        if bucket and not k.endswith("/n"):
            assert math.isnan(v), k  # documented: an empty bucket has no value
        else:
            assert math.isfinite(v), k
    assert got["meter/total/ess_token"] == 1.0 and got["meter/decomp/n_tokens"] == 0.0


def test_meter_imports_no_plotting_or_heavy_packages():
    import sys

    from tests.processes import run

    code = ("import sys, tether.meter, tether.meter.auto, tether.meter.budget, tether.meter.dump; "
            "bad = [m for m in ('matplotlib', 'pandas', 'pyarrow', 'rich') if m in sys.modules]; "
            "assert not bad, bad")
    run([sys.executable, "-c", code], check=True)


def test_profiles_can_be_limited_to_some_ratios():
    theta, old, mu, behave, mask = _batch(9)
    got = measure(mask_BT=mask, logp_theta_BT=theta, logp_old_BT=old, logp_mu_BT=mu, profiles=("total",))
    assert any(k.startswith("meter/total/by_pos/") for k in got)
    assert not any(k.startswith("meter/drift/by_") or k.startswith("meter/engine/by_") for k in got)
    with pytest.raises(ValueError, match="'totl'"):
        measure(mask_BT=mask, logp_old_BT=old, logp_mu_BT=mu, profiles=("totl",))


def test_minus_inf_on_padding_does_not_leak_and_single_token_quantiles():
    B, T = 3, 5
    mu = torch.full((B, T), -float("inf"), dtype=torch.float64)
    old = torch.full((B, T), -float("inf"), dtype=torch.float64)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mu[1, 2], old[1, 2], mask[1, 2] = -1.0, -0.7, True  # exactly one valid token, log r = 0.3
    got = to_floats(measure(mask_BT=mask, logp_old_BT=old, logp_mu_BT=mu))
    for q in ("p001", "p01", "p50", "p99", "p999", "min", "max"):
        assert got[f"meter/total/logr_{q}"] == pytest.approx(0.3, rel=1e-12), q
    assert got["meter/total/ess_token"] == 1.0 and got["meter/total/ess_seq"] == 1.0
    assert got["meter/total/kl_k3"] == pytest.approx(math.exp(0.3) - 1 - 0.3, rel=1e-12)
    assert all(math.isfinite(v) for k, v in got.items() if "/by_" not in k and not isinstance(v, str))
