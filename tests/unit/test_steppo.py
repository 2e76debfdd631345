"""StepPO (tether.objectives.steppo): a slow per-step loop reference, the true gradient, the GSPO reduction on
one-step rows, micro-batch split invariance, and the checks at the edge."""

from __future__ import annotations

import math

import pytest
import torch

from tether.objectives import get_preset
from tether.objectives.inputs import LossInputs
from tether.objectives.steppo import steppo_loss


def _batch(seed: int = 0, B: int = 4, T: int = 14, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    theta = (-torch.rand(B, T, generator=g, dtype=dtype) * 2).requires_grad_(True)
    old = theta.detach() + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)
    # rows: prompt, then turns of 1-4 policy tokens each separated by 1-2 env tokens (turn k also on its reply)
    mask = torch.zeros(B, T, dtype=torch.bool)
    step = torch.full((B, T), -1, dtype=torch.long)
    adv = torch.zeros(B, T, dtype=dtype)
    for b in range(B):
        t, k = 2, 0
        while t < T - 1 and k < 1 + b:
            n = int(torch.randint(1, 5, (1,), generator=g))
            a = float(torch.randn(1, generator=g, dtype=dtype))
            end = min(t + n, T)
            mask[b, t:end] = True
            step[b, t:end + 1 if end < T else end] = k
            adv[b, t:end] = a
            t, k = end + 2, k + 1
    return theta, old, adv, mask, step


def _reference(theta, old, adv, mask, step, *, ratio, eps_low, eps_high, step_weight, agg):
    """The obvious loop: per row, per distinct step, the step ratio and its clipped term."""
    rows, n_tokens = [], 0
    for b in range(theta.shape[0]):
        terms, lengths = [], []
        for k in sorted({int(x) for x in step[b][mask[b]]}):
            sel = [t for t in range(theta.shape[1]) if mask[b, t] and int(step[b, t]) == k]
            d = torch.stack([(theta[b, t] - old[b, t]).clamp(-20, 20) for t in sel])
            log_r = d.sum() / len(sel) if ratio == "geomean" else d.sum()
            r = torch.exp(log_r)
            a = sum(float(adv[b, t]) for t in sel) / len(sel)
            term = torch.maximum(-a * r, -a * torch.clamp(r, 1 - eps_low, 1 + eps_high))
            terms.append(term if step_weight == "one" else term * len(sel))
            lengths.append(len(sel))
        n_tokens += sum(lengths)
        if terms:
            total = torch.stack(terms).sum()
            rows.append(total / sum(lengths) if agg == "seq-mean-token-mean" else total)
    if agg == "token-mean":
        return torch.stack(rows).sum() / n_tokens
    return torch.stack(rows).sum() / len(rows)


@pytest.mark.parametrize("ratio", ["geomean", "product"])
@pytest.mark.parametrize("step_weight,agg", [("one", "seq-mean-token-sum"), ("tokens", "token-mean"),
                                             ("tokens", "seq-mean-token-mean"), ("one", "token-mean")])
def test_loss_and_gradient_match_the_loop_reference(ratio, step_weight, agg):
    theta, old, adv, mask, step = _batch(1)
    kw = dict(ratio=ratio, eps_low=0.2, eps_high=0.28, step_weight=step_weight, agg=agg)
    loss, metrics = steppo_loss(theta, old, adv, mask, step, **kw)
    (g,) = torch.autograd.grad(loss, theta)
    ref = _reference(theta, old, adv, mask, step, **kw)
    (g_ref,) = torch.autograd.grad(ref, theta)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    n_steps = len({(b, int(step[b, t])) for b, t in torch.nonzero(mask).tolist()})
    assert float(metrics["steppo/steps"]) == n_steps > theta.shape[0]  # several steps in some rows
    assert (g[~mask] == 0).all()


def test_gradcheck_in_the_unclipped_region():
    theta, old, adv, mask, step = _batch(2)
    old = theta.detach() + 0.01 * torch.randn_like(theta)  # ratios near 1: no clip kink within the step of gradcheck

    def f(x):
        return steppo_loss(x, old, adv, mask, step, ratio="product", eps_low=0.5, eps_high=0.5)[0]

    assert torch.autograd.gradcheck(f, (theta.detach().clone().requires_grad_(True),), eps=1e-6, atol=1e-8)


def test_clipped_steps_have_no_gradient_and_a_step_counts_once():
    theta = torch.zeros(1, 6, dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[0.0, -1.0, -1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)  # step 0: log r = 1 (geomean)
    mask = torch.tensor([[False, True, True, False, True, True]])
    step = torch.tensor([[-1, 0, 0, 0, 1, 1]])
    adv = torch.tensor([[0.0, 1.0, 1.0, 0.0, -2.0, -2.0]], dtype=torch.float64)
    for ratio, grad in (("geomean", 1.0), ("product", 2.0)):  # d log r / d log pi_t: 1/n_k, or 1
        loss, m = steppo_loss(theta, old, adv, mask, step, ratio=ratio, eps_low=0.2, eps_high=0.2)
        # step 0: r = e or e^2 > 1.2, A > 0 -> clipped, -1.2; step 1: r = 1, A = -2 -> +2; seq-mean-token-sum: their sum
        assert math.isclose(float(loss.detach()), -1.2 + 2.0, rel_tol=1e-12)
        (g,) = torch.autograd.grad(loss, theta)
        assert (g[0, 1:3] == 0).all() and torch.allclose(g[0, 4:], torch.tensor([grad, grad], dtype=torch.float64))
        assert float(m["steppo/clipfrac"]) == 0.5


def test_one_step_rows_are_gspo():
    """Without step indices (single-turn) every row is one step; geomean + token weights + seq-mean-token-mean
    is then GSPO (same clip ranges): the same loss and the same gradient."""
    theta, old, adv, mask, _ = _batch(3)
    adv = adv[:, :1].expand_as(adv).clone() * mask  # one advantage per row
    gspo = get_preset("gspo")
    kw = dict(eps_low=3e-4, eps_high=4e-4)
    ref, _ = gspo(LossInputs(theta, old, adv, mask), agg="seq-mean-token-mean", **kw)
    (g_ref,) = torch.autograd.grad(ref, theta)
    loss, _ = get_preset("steppo")(LossInputs(theta, old, adv, mask), ratio="geomean", step_weight="tokens",
                                   agg="seq-mean-token-mean", **kw)
    (g,) = torch.autograd.grad(loss, theta)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)


def test_micro_batches_with_global_normalisers_sum_to_the_batch_loss():
    theta, old, adv, mask, step = _batch(4)
    preset = get_preset("steppo")
    for agg in ("seq-mean-token-sum", "token-mean"):
        norm = dict(num_tokens=float(mask.sum()), num_seqs=float((mask.sum(-1) > 0).sum()))
        full, _ = preset(LossInputs(theta, old, adv, mask, step_BT=step, **norm), agg=agg)
        parts = sum(preset(LossInputs(theta[i], old[i], adv[i], mask[i], step_BT=step[i], **norm), agg=agg)[0]
                    for i in (slice(0, 1), slice(1, 4)))
        torch.testing.assert_close(parts, full, rtol=1e-12, atol=1e-12)


def test_bad_settings_and_step_indices_are_refused():
    preset = get_preset("steppo")
    with pytest.raises(ValueError, match="objective 'steppo'.*ratio"):
        preset.resolve({"ratio": "mean"})
    with pytest.raises(ValueError, match="step_weight"):
        preset.resolve({"step_weight": "len"})
    with pytest.raises(ValueError, match="eps_low"):
        preset.resolve({"eps_low": 1.5})
    theta, old, adv, mask, step = _batch(5)
    step[mask] = -1
    with pytest.raises(ValueError, match="negative step index"):
        steppo_loss(theta, old, adv, mask, step)
    with pytest.raises(ValueError, match="LossInputs.step_BT has shape"):
        LossInputs(theta, old, adv, mask, step_BT=step[:, :3])
