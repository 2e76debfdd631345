"""The verl adapter without verl: each ``tether_<preset>`` loss (verl's signature) equals tether's preset
on the same batch, the mu presets through their ``rollout_is_weights``, with verl's global-batch
normalisers; the meter hook and dump read verl's batch tensors. Parity with verl's own code:
tests/unit/test_verl_parity.py."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
import torch

from tether.adapters.verl import dump_batch, meter_metrics, policy_loss, rollout_is_weights, verl_presets
from tether.cli import main
from tether.meter import measure, to_floats
from tether.objectives import LossInputs, get_preset

pytestmark = pytest.mark.unit

B, T = 6, 7


def recorded_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """verl's batch tensors for one micro-batch: ragged lengths, one empty row, engine mismatch."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 3, 0, 5, 1, 6])
    mask = (torch.arange(T)[None, :] < lengths[:, None])
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3 - 0.05
    return {
        "old_log_probs": old,
        "rollout_log_probs": old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.4,
        "log_prob": old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3,
        "advantages": torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).contiguous(),
        "response_mask": mask,
    }


def run_both(preset, agg, config=None, *, overrides=None, with_mu=False, counts=None):
    """(verl-signature loss, grad) and (tether preset loss, grad) on the recorded batch."""
    b = recorded_batch()
    out = []
    for side in ("verl", "tether"):
        logp = b["log_prob"].clone().requires_grad_(True)
        if side == "verl":
            w = rollout_is_weights(preset, b["old_log_probs"], b["rollout_log_probs"], b["response_mask"],
                                   **(overrides or {})) if with_mu else None
            loss, metrics = policy_loss(preset, overrides)(b["old_log_probs"], logp, b["advantages"],
                                                           b["response_mask"], agg, config, w)
            assert all(k.startswith("tether/") and isinstance(v, float) for k, v in metrics.items())
        else:
            li = LossInputs(logp_theta_BT=logp, logp_old_BT=b["old_log_probs"], advantages_BT=b["advantages"],
                            mask_BT=b["response_mask"], logp_mu_BT=b["rollout_log_probs"] if with_mu else None,
                            **(counts or {}))
            loss, _ = get_preset(preset)(li, **{**(overrides or {}), "agg": agg})
        (grad,) = torch.autograd.grad(loss, logp)
        out.append((loss.detach(), grad))
    return out


AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


@pytest.mark.parametrize("preset, agg", [(p, a) for p in ("ppo", "grpo", "dapo", "cispo", "reinforce") for a in AGGS]
                         + [("gspo", "seq-mean-token-mean")])  # gspo refuses any other loss_agg_mode
def test_verl_signature_loss_equals_the_preset(preset, agg):
    (a, ga), (b, gb) = run_both(preset, agg)
    assert gb.abs().max() > 1e-4
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("preset, overrides", [
    ("tis", {"cap": 1.5}), ("tis", {"level": "sequence", "cap": 3.0}), ("tis", {"self_normalise": True}),
    ("icepop", {"low": 0.8, "high": 1.25}), ("mis", {}), ("mis", {"level": "token", "weighted": False}),
])
def test_mu_presets_through_rollout_is_weights_equal_the_preset_with_mu(preset, overrides):
    """The route for presets that need mu: tether's weights in verl's rollout_is_weights slot."""
    (a, ga), (b, gb) = run_both(preset, "token-mean", overrides=overrides, with_mu=True)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12)
    assert gb.abs().max() > 1e-4


def test_global_batch_info_sets_the_normalisers():
    """verl's dp_size / batch_num_tokens / global_batch_size / loss_scale_factor become tether's global counts."""
    info = {"dp_size": 2, "batch_num_tokens": 40, "global_batch_size": 9, "loss_scale_factor": 16}
    config = SimpleNamespace(global_batch_info=info)
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        (a, ga), (b, gb) = run_both("grpo", agg, config, counts={"num_tokens": 20.0, "num_seqs": 4.5, "horizon": 16})
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12)
    (local, _), _ = run_both("grpo", "token-mean")
    (scaled, _), _ = run_both("grpo", "token-mean", config)
    n_local = recorded_batch()["response_mask"].sum().item()
    assert scaled.item() == pytest.approx(local.item() * n_local / 20.0, rel=1e-12)


def test_misuse_is_refused_with_the_fix():
    b = recorded_batch()
    args = (b["old_log_probs"], b["log_prob"], b["advantages"], b["response_mask"])
    with pytest.raises(ValueError, match="enable algorithm.rollout_correction.rollout_is"):
        policy_loss("tis")(*args, "token-mean", None, None)
    with pytest.raises(ValueError, match="tether_gspo does not take verl's rollout_is_weights"):
        policy_loss("gspo")(*args, "token-mean", None, torch.ones(B, T, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown aggregation mode 'token-sum'"):
        policy_loss("grpo")(*args, "token-sum", None, None)
    with pytest.raises(ValueError, match="dp_size=2 needs global_batch_info"):
        policy_loss("grpo")(*args, "token-mean", SimpleNamespace(global_batch_info={"dp_size": 2}), None)
    with pytest.raises(ValueError, match="has no per-token weight"):
        rollout_is_weights("grpo", *args[:2], b["response_mask"])
    assert "tis" in verl_presets() and "opd" not in verl_presets() and "p3o" not in verl_presets()


def test_meter_hook_and_dump_of_a_verl_batch(tmp_path, capsys, monkeypatch):
    b = recorded_batch()
    got = meter_metrics(b)
    ref = to_floats(measure(mask_BT=b["response_mask"], logp_old_BT=b["old_log_probs"],
                            logp_mu_BT=b["rollout_log_probs"], logp_behave_old_BT=b["old_log_probs"], profiles=False))
    assert got["tether/meter/engine/kl_k3"] == pytest.approx(ref["meter/engine/kl_k3"], rel=1e-12)
    assert got["tether/meter/engine/ess_seq"] == pytest.approx(ref["meter/engine/ess_seq"], rel=1e-12)
    assert got["tether/meter/engine/n_tokens"] == b["response_mask"].sum().item()
    path = tmp_path / "verl_dump.jsonl"
    assert dump_batch(b, path, step=3) == B
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [len(r["rollout_log_probs"]) for r in rows] == [7, 3, 0, 5, 1, 6]
    monkeypatch.setattr(sys, "argv", ["tether"])
    assert main(["meter", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("engine/kl_k3", "engine/logr_p99", "total/ess_token"):
        assert report[f"meter/{key}"] == pytest.approx(got[f"tether/meter/{key}"], rel=1e-9), key
    with pytest.raises(ValueError, match="calculate_log_probs=True"):
        meter_metrics({"old_log_probs": b["old_log_probs"], "response_mask": b["response_mask"]})


def test_adapters_import_no_framework_until_asked():
    """``tether.adapters`` and its verl module import neither verl nor TRL (verl only in register_with_verl)."""
    from tests.processes import run as run_child

    code = ("import sys; import tether.adapters, tether.adapters.verl, tether.adapters.common; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'verl', 'trl', 'ray', 'transformers'}); "
            "print(bad); sys.exit(1 if bad else 0)")
    r = run_child([sys.executable, "-c", code])
    assert r.returncode == 0, r.stdout + r.stderr


def test_missing_verl_skips_a_plain_run_and_fails_where_the_target_installed_it(monkeypatch):
    """tests/unit/test_verl_parity.py imports verl through ``import_verl``: without TETHER_REQUIRE_VERL a
    missing verl skips the file; with TETHER_REQUIRE_VERL=1 (make test, make test-verl) it is an error."""
    from tests.unit.verl_required import REQUIRE, import_verl

    absent = "tether_no_such_peer.core_algos"
    monkeypatch.delenv(REQUIRE, raising=False)
    with pytest.raises(pytest.skip.Exception, match="not importable"):
        import_verl(absent)
    monkeypatch.setenv(REQUIRE, "1")
    with pytest.raises(ImportError, match=f"{REQUIRE}=1 but {absent} is not importable"):
        import_verl(absent)
    assert import_verl("json") is json  # a module that imports is returned either way
