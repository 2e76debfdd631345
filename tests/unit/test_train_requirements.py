"""Start-up preset checks (tether.train.requirements) and the registry's checked entry point."""

from __future__ import annotations

import json

import pytest
import torch

from tether.objectives.inputs import LossInputs
from tether.objectives.registry import Preset, get_preset, presets
from tether.tasks.registry import get_task
from tether.train.config import KLPlacement, TrainConfig, TrainMode
from tether.train.requirements import check_preset, check_requirements, expert_presets, inputs_available

pytestmark = pytest.mark.unit


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def no_solutions(tmp_path):
    return get_task(jsonl(tmp_path / "plain.jsonl", [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(30)]),
                    eval_fraction=0.0)


def test_what_the_rl_loop_fills(tmp_path):
    arithmetic = get_task("arithmetic")
    base = {"logp_mu_BT", "logp_prox_BT"}
    assert inputs_available(TrainConfig.from_flat(), arithmetic) == base | {"expert_B", "logp_expert_old_BT"}
    assert inputs_available(TrainConfig.from_flat(), no_solutions(tmp_path)) == base
    assert inputs_available(TrainConfig.from_flat(mode=TrainMode.ASYNC), arithmetic) == base  # expert rows: sync only
    kl = TrainConfig.from_flat(kl_placement=KLPlacement.LOSS, kl_coef=0.1)
    assert inputs_available(kl, no_solutions(tmp_path)) == base | {"logp_ref_BT"}


def test_distillation_presets_are_sent_to_tether_distill():
    for name in ("opd", "distill_jsd"):
        with pytest.raises(ValueError) as e:
            check_requirements(get_preset(name), TrainConfig.from_flat(), get_task("arithmetic"))
        msg = str(e.value)
        assert f"objective '{name}'" in msg and "logp_teacher" in msg
        assert f"use `tether distill --objective {name}`" in msg


def test_expert_presets_need_an_expert_column_and_the_sync_loop(tmp_path):
    assert expert_presets() == ["calibrl", "rl_plus"]
    for name in expert_presets():
        with pytest.raises(ValueError) as e:
            check_requirements(get_preset(name), TrainConfig.from_flat(), no_solutions(tmp_path))
        msg = str(e.value)
        assert f"objective '{name}'" in msg and "LossInputs.expert_B" in msg
        assert "needs a dataset with an `expert` or `solution` column" in msg and "(0 of 30 training rows" in msg
        with pytest.raises(ValueError, match="expert rows are added by the sync loop only: use --mode sync"):
            check_requirements(get_preset(name), TrainConfig.from_flat(mode=TrainMode.ASYNC), get_task("arithmetic"))
        check_requirements(get_preset(name), TrainConfig.from_flat(), get_task("arithmetic"))  # accepted


def test_a_reference_preset_needs_a_kl_and_unknown_fields_still_fail():
    fake = Preset(name="needs_ref", description="", fn=lambda inputs, **kw: None, requires=("logp_ref_BT",))
    with pytest.raises(ValueError, match="needs LossInputs.logp_ref_BT.*--kl-placement reward|loss"):
        check_requirements(fake, TrainConfig.from_flat(), get_task("arithmetic"))
    check_requirements(fake, TrainConfig.from_flat(kl_placement=KLPlacement.REWARD, kl_coef=0.1), get_task("arithmetic"))
    with pytest.raises(ValueError, match="objective 'needs_ref' needs LossInputs.logp_ref_BT.*no RL loop fills it"):
        check_preset(fake, {"logp_mu_BT"})


def full_inputs(seed=0, B=4, T=5, V=7):
    g = torch.Generator().manual_seed(seed)

    def lp(*shape):
        return torch.log_softmax(torch.randn(*shape, V, generator=g, dtype=torch.float64), -1)

    theta_BTV, teacher_BTV = lp(B, T), lp(B, T)
    ids = torch.randint(0, V, (B, T), generator=g)
    pick = lambda x: x.gather(-1, ids[..., None])[..., 0]  # noqa: E731
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False
    return LossInputs(
        logp_theta_BT=pick(theta_BTV), logp_old_BT=pick(lp(B, T)), advantages_BT=torch.randn(B, T, generator=g,
        dtype=torch.float64) * mask, mask_BT=mask, logp_mu_BT=pick(lp(B, T)), logp_prox_BT=pick(lp(B, T)),
        logp_ref_BT=pick(lp(B, T)), expert_B=torch.tensor([False, False, True, False]),
        logp_expert_old_BT=pick(lp(B, T)), logp_teacher_BT=pick(teacher_BTV), logp_theta_BTV=theta_BTV,
        logp_teacher_BTV=teacher_BTV)


@pytest.mark.parametrize("name", sorted(presets()))
def test_the_checked_entry_point_accepts_resolved_arguments(name):
    """The loops resolve (and may tighten) the hyper-parameters once, then call ``preset(inputs, **args)``
    every micro-batch: re-resolving a complete set must give ``fn``'s result."""
    preset = get_preset(name)
    args = preset.resolve(None)
    if name == "auto":
        args.update(level="sequence", threshold=3.0)  # what the mismatch control sets per step
    inputs = full_inputs()
    loss, metrics = preset(inputs, **args)
    want, want_metrics = preset.fn(inputs, **args)
    assert torch.equal(loss, want) and metrics.keys() == want_metrics.keys()
    missing = LossInputs(logp_theta_BT=inputs.logp_theta_BT, logp_old_BT=inputs.logp_old_BT,
                         advantages_BT=inputs.advantages_BT, mask_BT=inputs.mask_BT)
    if preset.requires:
        with pytest.raises(ValueError, match=f"objective '{name}' needs LossInputs.{preset.requires[0]}"):
            preset(missing, **args)
