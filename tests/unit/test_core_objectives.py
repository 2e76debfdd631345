"""Core objective algebra vs slow loop references: ratios, aggregation, PPO clip."""

import math

import pytest
import torch

from tether.objectives import LossInputs, aggregate, get_preset
from tether.objectives.policy_gradient import ppo_clip_loss, reinforce_loss
from tether.objectives.ratios import (
    cumulative_log_ratio,
    geometric_log_ratio,
    gspo_log_ratio,
    sequence_log_ratio,
    token_log_ratio,
)

pytestmark = pytest.mark.unit
DT = torch.float64
MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def make_batch(B=5, T=7, seed=0, extreme=False):
    g = torch.Generator().manual_seed(seed)
    logp_old = -torch.rand(B, T, generator=g, dtype=DT) * 3
    delta = torch.randn(B, T, generator=g, dtype=DT) * (50.0 if extreme else 0.3)
    logp_theta = (logp_old + delta).requires_grad_(True)
    adv = torch.randn(B, T, generator=g, dtype=DT)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0] = 0  # an empty row
    lengths[-1] = 1  # a length-1 row
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return logp_theta, logp_old, adv, mask


def ref_aggregate(loss, mask, mode, horizon=None):
    B, T = loss.shape
    seq_sums, seq_means, nonempty, tok = [], [], 0, 0
    total = 0.0
    for i in range(B):
        s, n = 0.0, 0
        for t in range(T):
            if mask[i, t]:
                s = s + loss[i, t]
                n += 1
        tok += n
        total = total + s
        if n:
            nonempty += 1
            seq_sums.append(s)
            seq_means.append(s / n)
    if mode == "token-mean":
        return total / max(tok, 1)
    if mode == "seq-mean-token-mean":
        return sum(seq_means) / max(nonempty, 1)
    if mode == "seq-mean-token-sum":
        return sum(seq_sums) / max(nonempty, 1)
    return sum(seq_sums) / (max(nonempty, 1) * (T if horizon is None else horizon))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aggregate_matches_loop(mode, seed):
    _, _, loss, mask = make_batch(seed=seed)
    got = aggregate(loss, mask, mode)
    want = ref_aggregate(loss, mask, mode)
    torch.testing.assert_close(got, torch.as_tensor(want, dtype=DT), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_aggregate_fully_masked_is_zero_not_nan(mode):
    loss = torch.full((3, 4), float("nan"), dtype=DT)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    assert aggregate(loss, mask, mode).item() == 0.0


def test_aggregate_unknown_mode_lists_valid():
    with pytest.raises(ValueError, match="token-mean"):
        aggregate(torch.zeros(1, 1), torch.ones(1, 1), "mean")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", [0, 3])
def test_aggregation_microbatch_invariance(mode, seed):
    """Summed micro-batch losses (global normalisers) equal the whole-batch loss, and so do gradients."""
    logp_theta, logp_old, adv, mask = make_batch(B=9, T=6, seed=seed)
    preset = get_preset("ppo")

    def loss_of(idx, **norm):
        inp = LossInputs(logp_theta[idx], logp_old[idx], adv[idx], mask[idx], **norm)
        return preset(inp, agg=mode)[0]

    whole = loss_of(torch.arange(9))
    (g_whole,) = torch.autograd.grad(whole, logp_theta)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(9, generator=g)
    splits = [perm[:2], perm[2:3], perm[3:7], perm[7:]]
    n_tok = mask.sum().item()
    n_seq = (mask.sum(-1) > 0).sum().item()
    parts = sum(loss_of(s, num_tokens=n_tok, num_seqs=n_seq, horizon=6) for s in splits)
    (g_parts,) = torch.autograd.grad(parts, logp_theta)
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_parts, g_whole, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("extreme", [False, True])
def test_ratios_match_loop(extreme):
    logp_theta, logp_old, _, mask = make_batch(extreme=extreme)
    B, T = mask.shape
    tok = token_log_ratio(logp_theta, logp_old, mask)
    seq = sequence_log_ratio(tok, mask)
    geo = geometric_log_ratio(tok, mask)
    cum = cumulative_log_ratio(logp_theta, logp_old, mask)
    cumg = cumulative_log_ratio(logp_theta, logp_old, mask, geomean=True)
    gs = gspo_log_ratio(logp_theta, logp_old, mask)
    for i in range(B):
        s, n = 0.0, 0
        for t in range(T):
            d = min(max((logp_theta[i, t] - logp_old[i, t]).item(), -20.0), 20.0) if mask[i, t] else 0.0
            assert tok[i, t].item() == pytest.approx(d, rel=1e-12, abs=1e-12)
            s += d
            n += int(bool(mask[i, t]))
            assert cum[i, t].item() == pytest.approx(min(s, 10.0), rel=1e-12, abs=1e-12)
            assert cumg[i, t].item() == pytest.approx(min(s / max(n, 1), 10.0), rel=1e-12, abs=1e-12)
        assert seq[i].item() == pytest.approx(s, rel=1e-12, abs=1e-12)
        assert geo[i].item() == pytest.approx(s / max(n, 1), rel=1e-12, abs=1e-12)
        for t in range(T):
            assert gs[i, t].item() == pytest.approx(min(s / max(n, 1), 10.0), rel=1e-12, abs=1e-12)
    assert torch.isfinite(tok).all() and torch.isfinite(cum).all()


def test_gspo_and_cumulative_gradient_paths():
    """GSPO: d exp(log s_t)/d logp_theta_t = s (only through its own token). CTPO likewise with rho_t."""
    logp_theta, logp_old, _, mask = make_batch(seed=4)
    for fn in (gspo_log_ratio, cumulative_log_ratio):
        lr = fn(logp_theta, logp_old, mask)
        w = torch.randn_like(lr)
        (g,) = torch.autograd.grad((torch.exp(lr) * w).sum(), logp_theta)
        want = torch.exp(lr.detach()) * w * (lr.detach() < 10.0)
        torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-12)


def ref_ppo(r, A, eps_low, eps_high, c):
    l1 = -A * r
    l2 = -A * min(max(r, 1 - eps_low), 1 + eps_high)
    ell = max(l1, l2)
    if c is not None and A < 0:
        ell = min(ell, -A * c)
    return ell


@pytest.mark.parametrize("extreme", [False, True])
@pytest.mark.parametrize("dual", [None, 3.0])
def test_ppo_clip_matches_loop(extreme, dual):
    logp_theta, logp_old, adv, mask = make_batch(seed=5, extreme=extreme)
    lr = token_log_ratio(logp_theta, logp_old, mask)
    loss, metrics = ppo_clip_loss(lr, adv, mask, eps_low=0.2, eps_high=0.28, dual_clip_c=dual)
    B, T = mask.shape
    for i in range(B):
        for t in range(T):
            r = math.exp(lr[i, t].item())
            want = ref_ppo(r, adv[i, t].item(), 0.2, 0.28, dual)
            assert loss[i, t].item() == pytest.approx(want, rel=1e-10, abs=1e-12)
    for v in metrics.values():
        assert not v.requires_grad


def test_ppo_gradient_unclipped_region_is_ratio_weighted_score():
    """Inside the trust region d l / d logp_theta = -A r; where clipped the gradient is 0."""
    logp_theta, logp_old, adv, mask = make_batch(seed=6)
    lr = token_log_ratio(logp_theta, logp_old, mask)
    loss, _ = ppo_clip_loss(lr, adv, mask, eps_low=0.2, eps_high=0.2)
    (g,) = torch.autograd.grad(loss.sum(), logp_theta)
    r = torch.exp(lr.detach())
    clipped = ((adv > 0) & (r > 1.2)) | ((adv < 0) & (r < 0.8))
    want = torch.where(mask & ~clipped, -adv * r, torch.zeros_like(r))
    torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-12)


def test_ppo_infinite_eps_equals_is_weighted_reinforce():
    """Preset identity: ppo with eps=inf has the gradient of IS-weighted REINFORCE (-sg(r) A log pi)."""
    logp_theta, logp_old, adv, mask = make_batch(seed=7)
    inp = LossInputs(logp_theta, logp_old, adv, mask)
    loss, _ = get_preset("ppo")(inp, eps_low=math.inf, eps_high=math.inf, dual_clip_c=None)
    (g_ppo,) = torch.autograd.grad(loss, logp_theta)
    r = torch.exp(token_log_ratio(logp_theta, logp_old, mask)).detach()
    is_loss = aggregate(reinforce_loss(logp_theta, adv, r), mask, "token-mean")
    (g_is,) = torch.autograd.grad(is_loss, logp_theta)
    torch.testing.assert_close(g_ppo, g_is, rtol=1e-12, atol=1e-12)
    # and the value is -A r averaged over tokens
    want = ref_aggregate(-adv * r, mask, "token-mean")
    torch.testing.assert_close(loss.detach(), torch.as_tensor(want, dtype=DT), rtol=1e-12, atol=1e-12)


def test_ppo_gradcheck_smooth_region():
    g = torch.Generator().manual_seed(8)
    logp_old = -torch.rand(2, 3, generator=g, dtype=DT)
    logp_theta = (logp_old + 0.01 * torch.randn(2, 3, generator=g, dtype=DT)).requires_grad_(True)
    adv = torch.randn(2, 3, generator=g, dtype=DT)
    mask = torch.ones(2, 3, dtype=torch.bool)

    def f(x):
        return get_preset("grpo")(LossInputs(x, logp_old, adv, mask))[0]

    assert torch.autograd.gradcheck(f, (logp_theta,))


def test_unknown_hyperparameter_names_valid_ones():
    logp_theta, logp_old, adv, mask = make_batch()
    with pytest.raises(ValueError, match="eps_high"):
        get_preset("ppo")(LossInputs(logp_theta, logp_old, adv, mask), epsilon=0.1)


def test_shape_mismatch_names_field():
    with pytest.raises(ValueError, match="advantages_BT"):
        LossInputs(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))
