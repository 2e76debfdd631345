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


def _full_logits_reference(model, rollout, replay_truncation):
    """The obvious computation: logits at every position, log-softmax over [B, T, V], then gather."""
    from tether.engine.sampling import entropy_from_logprobs, replay_logprobs
    from tether.engine.torch_engine import is_builtin

    tokens = rollout.tokens_BT
    if is_builtin(model):
        logits = model(tokens)
    else:
        logits = model(input_ids=tokens, attention_mask=rollout.attention_mask_BT.long(), use_cache=False).logits.float()
    kept = rollout.kept_count_BT[:, 1:] if replay_truncation and rollout.kept_count_BT is not None else None
    lp = replay_logprobs(logits[:, :-1], rollout.sampling.temperature, kept)
    tok = torch.cat([torch.zeros_like(tokens[:, :1], dtype=lp.dtype), lp.gather(-1, tokens[:, 1:, None])[..., 0]], 1)
    ent = torch.cat([torch.zeros_like(tok[:, :1]), entropy_from_logprobs(lp)], 1)
    mask = rollout.loss_mask_BT
    return torch.where(mask, tok, 0.0), torch.where(mask, ent, 0.0)


@pytest.mark.parametrize("kind", ["builtin", "llama"])
@pytest.mark.parametrize("replay", [True, False])
def test_completion_only_head_equals_full_logits_reference(kind, replay):
    """Scoring only completion positions (head from the first completion position, log-softmax on
    the completion tokens alone) gives the full computation's log-probs, entropies and gradients."""
    model = make_model(kind)
    engine = TorchEngine(model, eos_id=EOS, pad_id=PAD, copy=True)
    prompts = [p[: 3 + i] for i, p in enumerate(random_prompts(5, seed=4))]  # different prompt lengths
    rollout = engine.generate(prompts, SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=10), seed=2, n=2)
    assert len(set(rollout.prompt_len_B.tolist())) > 1
    grads = []
    for fn in (lambda: token_logprobs(model, rollout, replay_truncation=replay),
               lambda: _full_logits_reference(model, rollout, replay)):
        model.zero_grad()
        logp, ent = fn()
        (logp * torch.linspace(0.5, 1.5, logp.shape[1])).sum().backward()
        grads.append(([p.grad.clone() for p in model.parameters()], logp.detach(), ent.detach()))
    (g_new, lp_new, ent_new), (g_ref, lp_ref, ent_ref) = grads
    torch.testing.assert_close(lp_new, lp_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent_new, ent_ref, rtol=0, atol=1e-5)
    for a, b in zip(g_new, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert not ent_new.requires_grad
