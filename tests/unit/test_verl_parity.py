"""The verl adapter against verl's own code (verl 0.9.1, installed by scripts/setup_verl.sh into .venv-verl;
run with ``PYTHONPATH=$PWD:.venv-verl``, as ``make test`` and ``make test-verl`` do). Skipped when verl is not
importable, except under ``TETHER_REQUIRE_VERL=1`` (set by those targets, which installed it): there a
missing verl is a collection error, so the parity tests cannot silently skip in CI. verl's ``vanilla``,
``gspo`` and ``cispo`` losses and gradients equal ``tether_ppo``, ``tether_gspo`` and ``tether_cispo``;
verl's rollout-correction weights (token TIS, sequence TIS, IcePop band) equal tether's; contract
tests on the verl API the adapter relies on."""

from __future__ import annotations

import inspect

import pytest
import torch

from tests.unit.verl_required import import_verl

core_algos = import_verl("verl.trainer.ppo.core_algos")

from verl.trainer.ppo import rollout_corr_helper  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402

from tests.unit.test_verl_adapter import AGGS, recorded_batch  # noqa: E402
from tether.adapters.verl import SIGNATURE, policy_loss, register_with_verl, rollout_is_weights  # noqa: E402

pytestmark = pytest.mark.unit

TOL = 1e-6
INFO = {"dp_size": 2, "batch_num_tokens": 40, "global_batch_size": 9, "loss_scale_factor": 16}


def actor_config(low: float, high: float, info=None) -> ActorConfig:
    c = ActorConfig(strategy="fsdp", ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2, rollout_n=1,
                    clip_ratio=low, clip_ratio_low=low, clip_ratio_high=high)
    c.global_batch_info.update(info or {})
    return c


def both(verl_fn, tether_fn, agg, config, weights=None):
    b = recorded_batch()
    out = []
    for fn in (verl_fn, tether_fn):
        logp = b["log_prob"].clone().requires_grad_(True)
        loss, _ = fn(b["old_log_probs"], logp, b["advantages"], b["response_mask"], agg, config, weights)
        out.append((loss.detach(), torch.autograd.grad(loss, logp)[0]))
    return out


@pytest.mark.parametrize("info", [None, INFO])
@pytest.mark.parametrize("agg", AGGS)
def test_vanilla_equals_tether_ppo(agg, info):
    (a, ga), (b, gb) = both(core_algos.get_policy_loss_fn("vanilla"), policy_loss("ppo"), agg,
                            actor_config(0.2, 0.2, info))
    assert ga.abs().max() > 1e-4
    torch.testing.assert_close(b, a, rtol=TOL, atol=TOL)
    torch.testing.assert_close(gb, ga, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("info", [None, INFO])
def test_gspo_equals_tether_gspo(info):
    (a, ga), (b, gb) = both(core_algos.get_policy_loss_fn("gspo"), policy_loss("gspo"), "seq-mean-token-mean",
                            actor_config(3e-4, 4e-4, info))
    assert ga.abs().max() > 1e-4
    torch.testing.assert_close(b, a, rtol=TOL, atol=TOL)
    torch.testing.assert_close(gb, ga, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("agg", AGGS)
def test_cispo_equals_tether_cispo(agg):
    (a, ga), (b, gb) = both(core_algos.get_policy_loss_fn("cispo"), policy_loss("cispo"), agg,
                            actor_config(0.1, 0.1, INFO))
    torch.testing.assert_close(b, a, rtol=TOL, atol=TOL)
    torch.testing.assert_close(gb, ga, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("verl_args, preset, overrides", [
    (("token", 2.0), "tis", {"cap": 2.0}),
    (("sequence", 2.0), "tis", {"level": "sequence", "cap": 2.0}),
    (("token", "0.5_5.0"), "icepop", {"low": 0.5, "high": 5.0}),
])
def test_verl_rollout_correction_weights_equal_tethers(verl_args, preset, overrides):
    b = recorded_batch()
    mask = b["response_mask"].double()
    theirs, _ = rollout_corr_helper.compute_rollout_correction_weights(
        b["old_log_probs"] - b["rollout_log_probs"], mask, *verl_args)
    ours = rollout_is_weights(preset, b["old_log_probs"], b["rollout_log_probs"], b["response_mask"], **overrides)
    assert (ours[b["response_mask"]] != 1).any()
    torch.testing.assert_close(ours * mask, theirs * mask, rtol=1e-12, atol=1e-12)


def test_vanilla_with_verl_tis_weights_equals_tether_tis():
    """The documented route: verl's token TIS weights in rollout_is_weights + loss_mode tether_tis = verl's
    vanilla with the same weights."""
    b = recorded_batch()
    w, _ = rollout_corr_helper.compute_rollout_correction_weights(
        b["old_log_probs"] - b["rollout_log_probs"], b["response_mask"].double(), "token", 2.0)
    (a, ga), (c, gc) = both(core_algos.get_policy_loss_fn("vanilla"), policy_loss("tis"), "token-mean",
                            actor_config(0.2, 0.2, INFO), weights=w)
    torch.testing.assert_close(c, a, rtol=TOL, atol=TOL)
    torch.testing.assert_close(gc, ga, rtol=TOL, atol=TOL)


def test_contract_policy_loss_signature():
    for name in ("vanilla", "gspo", "cispo"):
        params = list(inspect.signature(core_algos.get_policy_loss_fn(name)).parameters)
        assert params == list(SIGNATURE), name
    assert "global_batch_info" in {f.name for f in ActorConfig.__dataclass_fields__.values()}


def test_register_with_verl_makes_tether_losses_selectable():
    names = register_with_verl(["tis", "grpo"])
    assert names == ["tether_tis", "tether_grpo"]
    fn = core_algos.get_policy_loss_fn("tether_grpo")
    b = recorded_batch()
    loss, metrics = fn(b["old_log_probs"], b["log_prob"], b["advantages"], b["response_mask"], "token-mean",
                       actor_config(0.2, 0.2), None)
    assert loss.shape == () and "tether/pg/clipfrac" in metrics


def test_the_external_lib_module_registers_every_verl_preset():
    """What verl's ``external_lib`` imports in each worker: every ``tether_<preset>`` becomes selectable."""
    import importlib

    from tether.adapters.verl import verl_presets

    module = importlib.import_module("tether.adapters.verl_register")
    assert module.REGISTERED == [f"tether_{n}" for n in verl_presets()]
    for name in module.REGISTERED:
        assert core_algos.get_policy_loss_fn(name).__name__ == name


@pytest.mark.parametrize("rollout_rs, threshold, estimator, agg, low, high", [
    # verl's k1 statistic is log(mu/pi_old), the mirror of tether's: verl "lower_upper" = tether [1/upper, 1/lower]
    ("token_k1", "0.8_1.5", "k1", "token", 1 / 1.5, 1 / 0.8),
    ("seq_sum_k1", "0.65_3.0", "k1", "seq-sum", 1 / 3.0, 1 / 0.65),
    ("seq_mean_k1", "0.9_1.02", "k1", "seq-mean", 1 / 1.02, 1 / 0.9),
    ("token_k3", "0.05", "k3", "token", None, 0.05),
    ("seq_mean_k3", "0.04", "k3", "seq-mean", None, 0.04),
    ("seq_max_k2", "0.1", "k2", "seq-max", None, 0.1),
])
def test_verl_rejection_masks_equal_tethers(rollout_rs, threshold, estimator, agg, low, high):
    from tether.objectives.rollout_correction import divergence_rejection_mask

    b = recorded_batch()
    mask = b["response_mask"]
    theirs, _ = rollout_corr_helper.compute_rollout_rejection_mask(
        b["old_log_probs"] - b["rollout_log_probs"], mask.double(), rollout_rs, threshold)
    ours = divergence_rejection_mask(b["old_log_probs"], b["rollout_log_probs"], mask, estimator=estimator, agg=agg,
                                     high=high, low=low)
    kept = theirs.bool() & mask
    assert 0 < kept.sum() < mask.sum()  # the band rejects some tokens and keeps others
    assert torch.equal(ours & mask, kept)
