"""THE mismatch-free baseline: at equal weights in fp32, the trainer's teacher-forced recomputation
reproduces the engine's logp_mu on every loss token, for every sampling transform."""

import pytest
import torch

from tests.engine.helpers import EOS, PAD, make_model, random_prompts
from tether.engine.torch_engine import TorchEngine
from tether.models.logprobs import token_logprobs
from tether.rollout import SamplingParams

pytestmark = pytest.mark.engine

COMBOS = [(t, k, p) for t in (0.7, 1.0, 1.3) for k in (None, 5) for p in (None, 0.9)]


@pytest.mark.parametrize("kind", ["builtin", "llama"])
def test_recompute_matches_logp_mu(kind):
    model = make_model(kind)
    engine = TorchEngine(model, eos_id=EOS, pad_id=PAD, copy=True)
    prompts = random_prompts(6, seed=1)
    for i, (temperature, top_k, top_p) in enumerate(COMBOS):
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=16)
        rollout = engine.generate(prompts, params, seed=i, n=2)
        with torch.no_grad():
            logp_BT, entropy_BT = token_logprobs(model, rollout)
        mask = rollout.loss_mask_BT
        assert mask.sum() > 0
        assert torch.isfinite(rollout.logp_mu_BT).all()
        assert (rollout.logp_mu_BT[mask] < 0).any()
        diff = (logp_BT - rollout.logp_mu_BT)[mask].abs().max().item()
        assert diff < 1e-5, f"{kind} T={temperature} top_k={top_k} top_p={top_p}: max |diff| = {diff}"
        assert (logp_BT[~mask] == 0).all() and (entropy_BT[~mask] == 0).all()
        assert (entropy_BT[mask] >= -1e-6).all()
        if params.truncates:
            assert rollout.kept_count_BT is not None
            kept = rollout.kept_count_BT[mask]
            assert (kept >= 1).all() and (kept <= (top_k or 10**9)).all()
            # without replaying the truncation the recomputation is a different distribution
            if (kept < model.config.vocab_size).any():
                with torch.no_grad():
                    full_BT, _ = token_logprobs(model, rollout, replay_truncation=False)
                assert ((full_BT - rollout.logp_mu_BT)[mask].abs().max() > 1e-3)
                assert (full_BT[mask] <= rollout.logp_mu_BT[mask] + 1e-5).all()
        else:
            assert rollout.kept_count_BT is None


def test_recompute_is_differentiable():
    model = make_model("builtin")
    engine = TorchEngine(model, eos_id=EOS, pad_id=PAD, copy=True)
    rollout = engine.generate(random_prompts(3), SamplingParams(top_k=5, max_new_tokens=8), seed=0)
    logp_BT, _ = token_logprobs(model, rollout)
    logp_BT.sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
