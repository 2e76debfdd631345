"""ALP (methods.md §(a)4): the ratio against the rollout policy (token and sequence variants) against loop
references with gradient checks, and the layerwise perturbation on the built-in and a Hugging Face model."""

from __future__ import annotations

import math

import pytest
import torch

from tether.models.perturb import (
    LayerPerturbation,
    decoder_layers,
    gaussian_noise,
    noise_seed,
    perturb_hidden,
)
from tether.models.tiny import TinyConfig, TinyLM
from tether.objectives import LossInputs, get_preset

B, T = 5, 7


def batch(seed: int = 0, spread: float = 0.3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mu = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    theta = mu + spread * torch.randn(B, T, generator=g, dtype=dtype)
    lengths = torch.tensor([7, 4, 1, 0, 6])  # row 3 is empty
    mask = torch.arange(T)[None, :] < lengths[:, None]
    adv = torch.randn(B, generator=g, dtype=dtype)[:, None].expand(B, T).clone() * mask
    theta = torch.where(mask, theta, 0.0)
    mu = torch.where(mask, mu, 0.0)
    return theta, mu, adv, mask


def inputs(theta, mu, adv, mask, old=None):
    return LossInputs(logp_theta_BT=theta, logp_old_BT=mu if old is None else old, advantages_BT=adv, mask_BT=mask,
                      logp_mu_BT=mu)


def surrogate(r: float, a: float, lo: float, hi: float, c: float) -> float:
    """The obvious dual-clip PPO surrogate of one ratio."""
    loss = max(-a * r, -a * min(max(r, lo), hi))
    return min(loss, -a * c) if a < 0 else loss


def token_reference(theta, mu, adv, mask, eps_low=0.2, eps_high=0.2, c=10.0) -> float:
    total, n = 0.0, 0
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                r = math.exp(max(min(float(theta[b, t] - mu[b, t]), 20.0), -20.0))
                total += surrogate(r, float(adv[b, t]), 1 - eps_low, 1 + eps_high, c)
                n += 1
    return total / n


def sequence_losses(theta, mu, adv, mask, eps_low=0.5, eps_high=3.0, c=3.0) -> torch.Tensor:
    """``l_i`` of every non-empty row, differentiable in ``theta``, written with the product ratio directly."""
    out = []
    for b in range(B):
        if not mask[b].any():
            continue
        log_s = (theta[b][mask[b]] - mu[b][mask[b]]).sum().clamp(-20, 20)
        s = log_s.exp()
        a = adv[b][mask[b]][0]
        loss = torch.maximum(-a * s, -a * s.clamp(1 - eps_low, 1 + eps_high))
        out.append(torch.minimum(loss, -a * c) if a < 0 else loss)
    return torch.stack(out)


@pytest.mark.parametrize("spread", [0.05, 0.3, 2.0])  # inside the clip, around it, far outside
def test_token_alp_matches_the_loop_and_ignores_pi_old(spread):
    theta, mu, adv, mask = batch(spread=spread)
    loss, metrics = get_preset("alp")(inputs(theta, mu, adv, mask))
    assert loss.item() == pytest.approx(token_reference(theta, mu, adv, mask), rel=1e-12, abs=1e-12)
    other_old = theta - 1.0  # bypass: pi_old is not read
    assert get_preset("alp")(inputs(theta, mu, adv, mask, old=other_old))[0].item() == loss.item()
    assert {"pg/clipfrac", "alp/token_ratio_mean", "alp/token_ratio_max"} <= set(metrics)


def test_token_alp_gradient_check():
    theta, mu, adv, mask = batch(spread=0.4)
    fn = get_preset("alp")
    assert torch.autograd.gradcheck(lambda th: fn(inputs(th, mu, adv, mask))[0], theta.clone().requires_grad_())


def test_token_alp_gradient_is_zero_where_the_clip_bites():
    theta, mu, adv, mask = batch(spread=0.0)
    theta = theta + torch.where(adv > 0, 0.5, -0.5) * mask  # every ratio outside its side of the trust region
    theta.requires_grad_()
    get_preset("alp")(inputs(theta, mu, adv, mask))[0].backward()
    assert torch.count_nonzero(theta.grad) == 0


@pytest.mark.parametrize("spread", [0.05, 0.3, 1.0])
def test_sequence_alp_value_is_the_mean_of_the_sequence_surrogates(spread):
    theta, mu, adv, mask = batch(spread=spread)
    loss, metrics = get_preset("alp_seq")(inputs(theta, mu, adv, mask))
    ref = sequence_losses(theta, mu, adv, mask)
    assert loss.item() == pytest.approx(ref.mean().item(), rel=1e-12, abs=1e-12)
    s = torch.stack([(theta[b][mask[b]] - mu[b][mask[b]]).sum().exp() for b in range(B) if mask[b].any()])
    assert metrics["alp/seq_ratio_mean"].item() == pytest.approx(s.mean().item(), rel=1e-12)
    assert metrics["alp/seq_ratio_max"].item() == pytest.approx(s.max().item(), rel=1e-12)


@pytest.mark.parametrize("spread", [0.05, 0.3, 1.0])
def test_sequence_alp_gradient_is_that_of_the_product_ratio_surrogate(spread):
    """With token-sum aggregation the stop-gradient form has exactly the gradient of mean_i l_i(s_i); with the
    default token-mean each row's gradient is divided by its length."""
    theta, mu, adv, mask = batch(spread=spread)
    th_ref = theta.clone().requires_grad_()
    sequence_losses(th_ref, mu, adv, mask).mean().backward()
    th = theta.clone().requires_grad_()
    get_preset("alp_seq")(inputs(th, mu, adv, mask), agg="seq-mean-token-sum")[0].backward()
    torch.testing.assert_close(th.grad, th_ref.grad, rtol=1e-10, atol=1e-12)
    th2 = theta.clone().requires_grad_()
    get_preset("alp_seq")(inputs(th2, mu, adv, mask))[0].backward()
    lengths = mask.sum(-1, keepdim=True).clamp(min=1).to(theta.dtype)
    torch.testing.assert_close(th2.grad, th_ref.grad / lengths, rtol=1e-10, atol=1e-12)


def test_alp_presets_on_an_empty_batch_give_zero_and_finite_metrics():
    theta, mu, adv, mask = batch()
    mask = torch.zeros_like(mask)
    for name in ("alp", "alp_seq"):
        loss, metrics = get_preset(name)(inputs(theta, mu, adv * 0, mask))
        assert loss.item() == 0.0 and all(torch.isfinite(v) for v in metrics.values())


def test_alp_presets_need_the_rollout_logprobs():
    theta, mu, adv, mask = batch()
    with pytest.raises(ValueError, match="logp_mu_BT"):
        get_preset("alp_seq")(LossInputs(logp_theta_BT=theta, logp_old_BT=mu, advantages_BT=adv, mask_BT=mask))


# -- the perturbation ------------------------------------------------------------------------------------------

def test_perturb_hidden_gradient_check():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    log_sigma = torch.tensor(-1.3, dtype=torch.float64, requires_grad=True)
    eps = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    out = perturb_hidden(h, log_sigma, eps)
    torch.testing.assert_close(out, h + math.exp(-1.3) * eps, rtol=1e-12, atol=0)
    assert torch.autograd.gradcheck(lambda a, s: perturb_hidden(a, s, eps), (h, log_sigma))


def test_noise_seeds_are_distinct_and_the_noise_repeats():
    seeds = {noise_seed(s, st, f, layer) for s in range(3) for st in range(4) for f in range(3) for layer in range(5)}
    assert len(seeds) == 3 * 4 * 3 * 5
    a = gaussian_noise(torch.Size([3, 4]), 123, dtype=torch.float32, device=torch.device("cpu"))
    b = gaussian_noise(torch.Size([3, 4]), 123, dtype=torch.float32, device=torch.device("cpu"))
    assert torch.equal(a, b) and not torch.equal(a, gaussian_noise(a.shape, 124, dtype=a.dtype, device=a.device))


def tiny(n_layers: int = 3) -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(TinyConfig(vocab_size=13, d_model=16, n_layers=n_layers, n_heads=2, d_ff=32, max_len=32)).double()


def test_the_hooks_add_seeded_noise_to_each_layer_input_of_the_builtin_model():
    model = tiny()
    tokens = torch.randint(0, 13, (2, 6), generator=torch.Generator().manual_seed(0))
    seen: list[torch.Tensor] = []

    def record(module, args):
        seen.append(args[0].detach().clone())

    handles = [layer.register_forward_pre_hook(record) for layer in decoder_layers(model)]
    clean = model(tokens)
    clean_inputs = list(seen)
    for h in handles:
        h.remove()
    alp = LayerPerturbation(3, std=0.1, start=1, seed=7).double().attach(model)  # layers 1 and 2
    handles = [layer.register_forward_pre_hook(record) for layer in decoder_layers(model)]  # run after ALP's
    seen.clear()
    alp.begin_step(5)
    noisy = model(tokens)
    torch.testing.assert_close(seen[0], clean_inputs[0], rtol=0, atol=0)  # layer 0 is not perturbed
    eps1 = gaussian_noise(seen[1].shape, noise_seed(7, 5, 0, 1), dtype=torch.float64, device=torch.device("cpu"))
    sigma1 = float(alp.sigmas()[0])
    assert sigma1 == pytest.approx(0.1, rel=1e-6)
    torch.testing.assert_close(seen[1], clean_inputs[1] + sigma1 * eps1, rtol=1e-12, atol=1e-12)
    for h in handles:
        h.remove()
    assert not torch.allclose(noisy, clean)
    alp.begin_step(5)
    torch.testing.assert_close(model(tokens), noisy, rtol=0, atol=0)  # the same step and forward: the same noise
    assert not torch.allclose(model(tokens), noisy)  # the next forward of the step draws new noise
    alp.begin_step(6)
    assert not torch.allclose(model(tokens), noisy)  # another step: other noise
    alp.detach_hooks()
    torch.testing.assert_close(model(tokens), clean, rtol=0, atol=0)


def test_sigma_gradient_matches_finite_differences_on_the_builtin_model():
    model = tiny(2)
    tokens = torch.randint(0, 13, (2, 5), generator=torch.Generator().manual_seed(3))
    w = torch.randn(2, 5, 13, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    alp = LayerPerturbation(2, std=0.3, seed=1).double().attach(model)

    def loss() -> torch.Tensor:
        alp.begin_step(2)
        return (model(tokens) * w).sum()

    loss().backward()
    grad = alp.log_sigma_L.grad.clone()
    numeric = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for i in range(2):
            for sign in (1, -1):
                alp.log_sigma_L[i] += sign * 1e-3  # the model's logits are fp32: a step well above their noise
                numeric[i] += sign * loss() / 2e-3
                alp.log_sigma_L[i] -= sign * 1e-3
    torch.testing.assert_close(grad, numeric, rtol=1e-3, atol=1e-6)
    assert grad.abs().min() > 0


def test_fixed_scales_are_a_buffer_with_no_optimiser_group():
    alp = LayerPerturbation(4, std=1e-3, learnable=False)
    assert not alp.learnable and alp.param_groups(1e-2) == [] and list(alp.parameters()) == []
    assert alp.metrics()["alp/sigma_l3"] == pytest.approx(1e-3)
    learn = LayerPerturbation(4, std=1e-3, start=2)
    assert learn.param_groups(1e-2)[0]["lr"] == 1e-2 and set(learn.metrics()) == {
        "alp/sigma_mean", "alp/sigma_min", "alp/sigma_max", "alp/sigma_l2", "alp/sigma_l3"}


@pytest.mark.parametrize("kw, match", [(dict(std=0.0), "std"), (dict(std=1e-3, start=2, end=2), "non-empty"),
                                        (dict(std=1e-3, end=5), "within")])
def test_bad_perturbation_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        LayerPerturbation(4, **kw)


def test_a_model_without_decoder_layers_is_refused():
    with pytest.raises(ValueError, match="decoder layers"):
        decoder_layers(torch.nn.Linear(2, 2))


def hf_llama(gradient_checkpointing: bool):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=19, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg).double()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def hf_grads(gradient_checkpointing: bool) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    model = hf_llama(gradient_checkpointing)
    tokens = torch.randint(0, 19, (2, 6), generator=torch.Generator().manual_seed(5))
    alp = LayerPerturbation(2, std=0.2, seed=3).double().attach(model)
    alp.begin_step(4)
    logits = model(input_ids=tokens, use_cache=False).logits
    logits.square().mean().backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters()], alp.log_sigma_L.grad.clone()


def test_hugging_face_llama_is_perturbed_and_recomputation_sees_the_same_noise():
    """Gradient checkpointing re-runs each decoder layer (and its hook) in backward: the gradients equal those of
    the plain forward only if the recomputation drew the same noise."""
    logits, grads, sigma_grad = hf_grads(False)
    logits_ck, grads_ck, sigma_grad_ck = hf_grads(True)
    torch.testing.assert_close(logits_ck, logits, rtol=0, atol=0)
    for a, b in zip(grads_ck, grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sigma_grad_ck, sigma_grad, rtol=1e-10, atol=1e-12)
    clean = hf_llama(False)(input_ids=torch.randint(0, 19, (2, 6), generator=torch.Generator().manual_seed(5)),
                            use_cache=False).logits
    assert not torch.allclose(clean, logits) and sigma_grad.abs().min() > 0


# -- the config ------------------------------------------------------------------------------------------------

def test_alp_config_fields_are_checked_at_the_edge():
    from tether.train.config import TrainConfig

    cfg = TrainConfig.from_flat(alp=True, alp_std=0.01, alp_end=2, objective="alp")
    assert cfg.perturb.std == 0.01 and cfg.perturb.end == 2 and cfg.perturb.learnable
    assert TrainConfig.from_flat(alp=True).perturb.std == 1e-6
    assert TrainConfig.from_flat().perturb is None
    for values, match in [
        (dict(alp_std=0.1), "'alp_std' needs alp"),
        (dict(alp=True, alp_std=0.0), "alp_std"),
        (dict(alp=True, alp_lr=-1.0), "alp_lr"),
        (dict(alp=True, alp_start=2, alp_end=2), "alp_end"),
        (dict(alp=True, mode="dist"), "mode 'dist'"),
        (dict(alp=True, mode="async", old_logits="snapshot"), "old_logits 'recompute'"),
    ]:
        with pytest.raises(ValueError, match=match):
            TrainConfig.from_flat(**values)


def test_the_layers_of_a_lora_wrapped_model_are_found():
    peft = pytest.importorskip("peft")
    model = hf_llama(False)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert decoder_layers(wrapped) is model.model.layers
    alp = LayerPerturbation(2, std=0.2).double().attach(wrapped)
    tokens = torch.randint(0, 19, (1, 4), generator=torch.Generator().manual_seed(0))
    alp.begin_step(0)
    noisy = wrapped(input_ids=tokens).logits
    alp.detach_hooks()
    assert alp.forward_index == 0 and not torch.allclose(noisy, wrapped(input_ids=tokens).logits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch.cuda.is_available() is false")
def test_on_cuda_the_noise_repeats_and_bf16_recomputation_sees_it():
    """Not run on the CPU-only CI; written for a machine with a GPU (bf16 autocast, CUDA generators)."""
    transformers = pytest.importorskip("transformers")
    dev = torch.device("cuda")
    a = gaussian_noise(torch.Size([4, 8]), 99, dtype=torch.float32, device=dev)
    assert torch.equal(a, gaussian_noise(a.shape, 99, dtype=torch.float32, device=dev))

    def run(checkpointing: bool):
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=19, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = transformers.LlamaForCausalLM(cfg).to(dev)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        alp = LayerPerturbation(3, std=0.05, seed=3).to(dev).attach(model.train())
        alp.begin_step(1)
        tokens = torch.randint(0, 19, (4, 16), generator=torch.Generator().manual_seed(0)).to(dev)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=tokens, use_cache=False).logits
        logits.float().square().mean().backward()
        return logits.detach().float(), alp.log_sigma_L.grad.clone()

    (logits, sigma_grad), (logits_ck, sigma_grad_ck) = run(False), run(True)
    torch.testing.assert_close(logits_ck, logits, rtol=1e-3, atol=1e-3)  # GPU kernels need not be bitwise
    torch.testing.assert_close(sigma_grad_ck, sigma_grad, rtol=1e-2, atol=1e-6)
    assert sigma_grad.abs().min() > 0
