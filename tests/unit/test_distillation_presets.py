"""Distillation / SFT / PEAR presets vs hand-written references."""

from __future__ import annotations

import math

import pytest
import torch

from tether.objectives import LossInputs, get_preset
from tether.objectives.distillation import pear_log_weights

B, T, V = 3, 6, 5


def _inputs(seed=0, logits=None, **extra):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    logp_BTV = z.log_softmax(-1).requires_grad_(True) if logits is None else logits.log_softmax(-1)
    tok = torch.randint(0, V, (B, T), generator=g)
    logp_BT = logp_BTV.gather(-1, tok[..., None])[..., 0]
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 4:] = False
    mask[2, :1] = False
    teacher_BTV = torch.randn(B, T, V, generator=g, dtype=torch.float64).log_softmax(-1)
    return LossInputs(
        logp_theta_BT=logp_BT, logp_old_BT=logp_BT.detach(), advantages_BT=torch.randn(B, T, generator=g,
                                                                                         dtype=torch.float64),
        mask_BT=mask, logp_teacher_BT=teacher_BTV.gather(-1, tok[..., None])[..., 0],
        logp_theta_BTV=logp_BTV, logp_teacher_BTV=teacher_BTV,
        logp_mu_BT=logp_BT.detach() + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64), **extra)


def test_opd_sampled_gradient_is_minus_teacher_advantage():
    x = _inputs()
    loss, metrics = get_preset("opd")(x)
    m = x.mask_BT.double()
    adv = (x.logp_teacher_BT - x.logp_old_BT) * m
    # d loss / d logp_theta_BT = -adv / N at theta = old
    grad = torch.autograd.grad(loss, x.logp_theta_BT)[0]
    torch.testing.assert_close(grad, -adv / m.sum(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(metrics["opd/reverse_kl_sampled"], (-adv).sum() / m.sum())


def test_opd_rl_mix_adds_the_advantage():
    x = _inputs()
    grad = torch.autograd.grad(get_preset("opd")(x, rl_coef=0.5, kl_coef=2.0)[0], x.logp_theta_BT)[0]
    m = x.mask_BT.double()
    want = -(0.5 * x.advantages_BT + 2.0 * (x.logp_teacher_BT - x.logp_old_BT)) * m / m.sum()
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["distill_reverse_kl", "distill_forward_kl", "distill_jsd", "distill_tv"])
def test_vocab_presets_token_mean_of_divergence(name):
    from tether.objectives.divergences import divergence

    x = _inputs()
    loss, metrics = get_preset(name)(x)
    d = divergence(x.logp_theta_BTV, x.logp_teacher_BTV, get_preset(name).defaults["divergence"])
    m = x.mask_BT.double()
    torch.testing.assert_close(loss, (d * m).sum() / m.sum(), rtol=1e-12, atol=1e-14)


def test_vocab_preset_stopgrad_matches_exact_gradient_on_topk():
    """Through the student's softmax (logits z), the stop-gradient form has the exact top-k gradient."""
    z = torch.randn(B, T, V, generator=torch.Generator().manual_seed(9), dtype=torch.float64, requires_grad=True)
    x1, x2 = _inputs(1, logits=z), _inputs(1, logits=z)
    g1 = torch.autograd.grad(get_preset("distill_reverse_kl")(x1, support="topk_student", k=2)[0], z)[0]
    g2 = torch.autograd.grad(get_preset("distill_reverse_kl")(x2, support="topk_student", k=2, stopgrad=True)[0],
                             z)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="'reverse_kl' only"):
        get_preset("distill_tv")(x1, stopgrad=True)


def test_vocab_mismatch_is_an_error_naming_both_sizes():
    x = _inputs()
    x.logp_teacher_BTV = torch.zeros(B, T, V + 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=f"teacher vocabulary size {V + 2} differs from the student's {V}"):
        get_preset("distill_forward_kl")(x)


def test_sft_is_token_mean_nll():
    x = _inputs()
    loss, _ = get_preset("sft")(x)
    m = x.mask_BT.double()
    torch.testing.assert_close(loss, -(x.logp_theta_BT * m).sum() / m.sum(), rtol=1e-12, atol=1e-14)


def _loop_pear(lr, mask, mode, gamma, block):
    out = torch.zeros_like(lr)
    for b in range(lr.shape[0]):
        idx = [t for t in range(lr.shape[1]) if mask[b, t]]
        x = [float(lr[b, t]) for t in idx]
        if mode == "sequence":
            w = [sum(x)] * len(x)
        elif mode == "token":
            w = [sum(gamma ** (j - i) * x[j] for j in range(i, len(x))) for i in range(len(x))]
        else:
            blocks = [sum(x[i:i + block]) for i in range(0, len(x), block)]
            w = [sum(gamma ** (c - i // block) * blocks[c] for c in range(i // block, len(blocks)))
                 for i in range(len(x))]
        for t, v in zip(idx, w):
            out[b, t] = v
    return out


@pytest.mark.parametrize("mode,gamma,block", [("sequence", 1.0, 4), ("token", 1.0, 4), ("token", 0.7, 4),
                                              ("block", 1.0, 2), ("block", 0.5, 3)])
def test_pear_log_weights_match_loop(mode, gamma, block):
    x = _inputs(2)
    got = pear_log_weights(x.logp_theta_BT, x.logp_mu_BT, x.mask_BT, mode=mode, gamma=gamma, block=block)
    lr = (x.logp_theta_BT - x.logp_mu_BT).detach()
    torch.testing.assert_close(got, _loop_pear(lr, x.mask_BT, mode, gamma, block), rtol=1e-12, atol=1e-12)
    assert not got.requires_grad


def test_pear_loss_weights_are_clipped_normalised_and_detached():
    x = _inputs(3)
    loss, metrics = get_preset("pear")(x, mode="sequence", clip_max=1.5, normalize=False)
    lw = pear_log_weights(x.logp_theta_BT, x.logp_mu_BT, x.mask_BT, mode="sequence")
    w = lw.exp().clamp(max=1.5) * x.mask_BT
    m = x.mask_BT.double()
    torch.testing.assert_close(loss, -(w * x.logp_theta_BT * m).sum() / m.sum(), rtol=1e-12, atol=1e-14)
    grad = torch.autograd.grad(loss, x.logp_theta_BT)[0]
    torch.testing.assert_close(grad, -w / m.sum(), rtol=1e-12, atol=1e-14)
    loss_n, _ = get_preset("pear")(_inputs(3), mode="sequence", clip_max=1.5, normalize=True)
    wn = w / ((w * m).sum() / m.sum())
    torch.testing.assert_close(loss_n, -(wn * x.logp_theta_BT.detach() * m).sum() / m.sum(), rtol=1e-12, atol=1e-14)
    assert math.isclose(float(metrics["pear/clip_frac"]), float(((lw.exp() > 1.5) & x.mask_BT).sum() / m.sum()))


def test_pear_requires_behaviour_logprobs():
    x = _inputs()
    x.logp_mu_BT = None
    with pytest.raises(ValueError, match="logp_mu_BT"):
        get_preset("pear")(x)
