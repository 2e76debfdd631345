"""The sync loop's single forward: with one mini-batch, pi_old is the detached value of the update's
own forward and that forward's graph drives the update. It must give the update a separate
recomputation would have given."""

import copy

import pytest
import torch

from tests.engine.helpers import EOS, PAD, random_prompts, tiny_builtin
from tether.engine.torch_engine import TorchEngine
from tether.objectives import get_preset
from tether.rollout import SamplingParams
from tether.train import setup
from tether.train.config import TrainConfig
from tether.train.update import update_phase

pytestmark = pytest.mark.unit


def test_reused_forward_gives_the_update_of_a_separate_recompute():
    cfg = TrainConfig.from_flat(prompts_per_step=3, group_size=2, max_new_tokens=6, lr=1e-3, top_k=5)
    model = tiny_builtin(seed=0)
    engine = TorchEngine(model, eos_id=EOS, pad_id=PAD, copy=True)
    rollout = engine.generate(random_prompts(3, seed=4), setup.sampling_params(cfg), seed=0, n=2)
    assert isinstance(rollout.sampling, SamplingParams) and rollout.kept_count_BT is not None
    preset = get_preset("grpo")
    args = preset.resolve(None)
    adv_BT = torch.randn(rollout.batch_size, generator=torch.Generator().manual_seed(1))[:, None] * rollout.loss_mask_BT
    keep_B = torch.ones(rollout.batch_size, dtype=torch.bool)
    start = {k: v.clone() for k, v in model.state_dict().items()}

    separate, reused = copy.deepcopy(model), copy.deepcopy(model)
    opt_a, _ = setup.build_optimizer(cfg, separate)
    with torch.no_grad():
        old_a, _ = setup.token_logprobs(separate, rollout, cfg)
    out_a = update_phase(cfg, preset, args, separate, opt_a, rollout, keep_B, old_a, None, adv_BT, step=0,
                         logprobs=lambda m, r: setup.token_logprobs(m, r, cfg))

    opt_b, _ = setup.build_optimizer(cfg, reused)
    theta_b, _ = setup.token_logprobs(reused, rollout, cfg)
    assert theta_b.requires_grad
    old_b = theta_b.detach()
    assert torch.equal(old_a, old_b)  # the same kernels with and without gradients
    out_b = update_phase(cfg, preset, args, reused, opt_b, rollout, keep_B, old_b, None, adv_BT, step=0,
                         logprobs=lambda m, r: setup.token_logprobs(m, r, cfg), first_logp_theta_BT=theta_b)

    assert out_a["finite"] and out_b["finite"]
    assert abs(out_a["loss"] - out_b["loss"]) < 1e-6 and abs(out_a["grad_norm"] - out_b["grad_norm"]) < 1e-5
    moved = max((p - start[k]).abs().max().item() for k, p in separate.state_dict().items())
    assert moved > 1e-4  # the update did something (a detached reuse would leave the weights alone)
    b = reused.state_dict()
    for k, p in separate.state_dict().items():
        assert (p - b[k]).abs().max() < 1e-6, k
