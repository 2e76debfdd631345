"""Split invariance of the trainer's update phase: for every RL preset, one step split into micro-batches
(gradient accumulation) gives the parameters of the unsplit step (float64 tiny model, tight tolerance).

The step has two epochs and an anchor pi_old that differs from pi_theta, so the ratios are not 1 and a preset
that read a whole-batch statistic (P3O's ESS) per micro-batch would move the weights differently."""

import copy
import dataclasses

import pytest
import torch

from tests.engine.helpers import EOS, PAD, random_prompts, tiny_builtin
from tether.engine.torch_engine import TorchEngine
from tether.objectives.registry import presets
from tether.train import setup
from tether.train.config import TrainConfig
from tether.train.update import update_phase

pytestmark = pytest.mark.unit
LOOP_INPUTS = {"logp_mu_BT", "logp_prox_BT", "logp_ref_BT"}
RL_PRESETS = sorted(name for name, p in presets().items() if set(p.requires) <= LOOP_INPUTS)
STEP_ARGS = {"rejection": {"high": 0.1}}
"""Presets whose defaults would drop every token of this deliberately far-off-policy step (k3 seq-mean ~ 0.05
against rejection's 0.01), so the step could not move the weights."""


@pytest.fixture(scope="module")
def step():
    cfg = TrainConfig.from_flat(prompts_per_step=3, group_size=2, max_new_tokens=6, lr=1e-3, epochs=2)
    model = tiny_builtin(seed=0)
    rollout = TorchEngine(model, eos_id=EOS, pad_id=PAD, copy=True).generate(
        random_prompts(3, seed=4), setup.sampling_params(cfg), seed=0, n=2)
    model = model.double()
    g = torch.Generator().manual_seed(1)
    mask = rollout.loss_mask_BT
    with torch.no_grad():
        theta, _ = setup.token_logprobs(model, rollout, cfg)
    old = theta + 0.2 * torch.randn(theta.shape, generator=g, dtype=torch.float64) * mask
    rollout = dataclasses.replace(rollout, logp_mu_BT=old + 0.3 * torch.randn(old.shape, generator=g,
                                                                              dtype=torch.float64) * mask)
    adv = torch.randn(rollout.batch_size, generator=g, dtype=torch.float64)[:, None] * mask
    return cfg, model, rollout, old, adv


def _train(cfg, model, rollout, old, adv, name, micro):
    preset = presets()[name]
    m = copy.deepcopy(model)
    cfg = dataclasses.replace(cfg, micro_batch_size=micro)
    opt, _ = setup.build_optimizer(cfg, m)
    keep = torch.ones(rollout.batch_size, dtype=torch.bool)
    out = update_phase(cfg, preset, preset.resolve(STEP_ARGS.get(name)), m, opt, rollout, keep, old, old, adv, 0,
                       logprobs=lambda mm, r: setup.token_logprobs(mm, r, cfg))
    assert out["finite"]
    return m.state_dict()


@pytest.mark.parametrize("name", RL_PRESETS)
def test_micro_batches_give_the_whole_batch_update(step, name):
    cfg, model, rollout, old, adv = step
    whole = _train(cfg, model, rollout, old, adv, name, None)
    split = _train(cfg, model, rollout, old, adv, name, 2)
    start = model.state_dict()
    assert max((whole[k] - start[k]).abs().max().item() for k in start) > 1e-5  # the step moved the weights
    for k in whole:
        torch.testing.assert_close(split[k], whole[k], rtol=0, atol=1e-10, msg=f"{name}: {k}")


def test_the_test_sees_a_per_micro_batch_statistic(step):
    """Control: P3O with its whole-step statistic switched off (ESS per micro-batch, FeynRL's behaviour)
    moves the weights differently under the split, so the check above can fail."""
    from tether.objectives import registry

    cfg, model, rollout, old, adv = step
    real = registry._PRESETS["p3o"]
    registry._PRESETS["p3o"] = dataclasses.replace(real, batch_stats=None)
    try:
        whole = _train(cfg, model, rollout, old, adv, "p3o", None)
        split = _train(cfg, model, rollout, old, adv, "p3o", 2)
    finally:
        registry._PRESETS["p3o"] = real
    assert max((whole[k] - split[k]).abs().max().item() for k in whole) > 1e-6
