"""Divergences vs slow per-position loop references, tail-bucket mass, gradients (float64 gradcheck)
and the unbiasedness of the sampled-token estimators by exact enumeration."""

from __future__ import annotations

import math

import pytest
import torch

from tether.objectives import divergences as D

B, T, V = 2, 3, 7


def _logps(seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, T, V, generator=g, dtype=dtype) * 1.5
    t = torch.randn(B, T, V, generator=g, dtype=dtype) * 1.5
    return s.log_softmax(-1), t.log_softmax(-1)


def _loop(fn, s, t):
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for i in range(T):
            ps = [math.exp(x) for x in s[b, i].tolist()]
            pt = [math.exp(x) for x in t[b, i].tolist()]
            out[b, i] = fn(ps, pt)
    return out


def ref_fkl(ps, pt):
    return sum(q * math.log(q / p) for p, q in zip(ps, pt) if q > 0)


def ref_rkl(ps, pt):
    return sum(p * math.log(p / q) for p, q in zip(ps, pt) if p > 0)


def ref_jsd(beta):
    def f(ps, pt):
        m = [beta * q + (1 - beta) * p for p, q in zip(ps, pt)]
        kl_t = sum(q * math.log(q / mm) for q, mm in zip(pt, m))
        kl_s = sum(p * math.log(p / mm) for p, mm in zip(ps, m))
        return beta * kl_t + (1 - beta) * kl_s
    return f


def ref_tv(ps, pt):
    return 0.5 * sum(abs(p - q) for p, q in zip(ps, pt))


@pytest.mark.parametrize("name,ref", [("forward_kl", ref_fkl), ("reverse_kl", ref_rkl), ("jsd", ref_jsd(0.5)),
                                      ("tv", ref_tv)])
def test_full_vocab_matches_loop(name, ref):
    s, t = _logps(0)
    torch.testing.assert_close(D.divergence(s, t, name), _loop(ref, s, t), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_beta_matches_loop_and_endpoints(beta):
    s, t = _logps(1)
    torch.testing.assert_close(D.generalized_jsd(s, t, beta=beta), _loop(ref_jsd(beta), s, t), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(D.generalized_jsd(s, t, beta=0.0), _loop(ref_fkl, s, t), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(D.generalized_jsd(s, t, beta=1.0), _loop(ref_rkl, s, t), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="beta"):
        D.generalized_jsd(s, t, beta=1.5)


def test_divergences_are_zero_for_equal_distributions_and_positive_otherwise():
    s, t = _logps(2)
    for name in ("forward_kl", "reverse_kl", "jsd", "tv"):
        assert D.divergence(s, s, name).abs().max() < 1e-12
        assert (D.divergence(s, t, name) > 0).all()


@pytest.mark.parametrize("source", ["teacher", "student"])
@pytest.mark.parametrize("k", [1, 3, V])
def test_topk_buckets_loop_reference_and_mass(source, k):
    s, t = _logps(3)
    bs, bt = D.topk_buckets(s, t, k=k, source=source)
    assert bs.shape == (B, T, k + 1)
    torch.testing.assert_close(bs.exp().sum(-1), torch.ones(B, T, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(bt.exp().sum(-1), torch.ones(B, T, dtype=torch.float64), rtol=0, atol=1e-12)
    for b in range(B):
        for i in range(T):
            ref = (t if source == "teacher" else s)[b, i].tolist()
            order = sorted(range(V), key=lambda v: -ref[v])[:k]
            ps, pt = s[b, i].exp().tolist(), t[b, i].exp().tolist()
            want_s = [ps[v] for v in order] + [sum(ps[v] for v in range(V) if v not in order)]
            want_t = [pt[v] for v in order] + [sum(pt[v] for v in range(V) if v not in order)]
            torch.testing.assert_close(bs[b, i].exp(), torch.tensor(want_s, dtype=torch.float64), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(bt[b, i].exp(), torch.tensor(want_t, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    # the bucketed divergence is a coarsening: never larger than the full one (data processing inequality)
    for name in ("forward_kl", "reverse_kl", "jsd", "tv"):
        full = D.divergence(s, t, name)
        top = D.supported_divergence(s, t, name, support=f"topk_{source}", k=k)
        assert (top <= full + 1e-12).all()
        if k == V:
            torch.testing.assert_close(top, full, rtol=1e-10, atol=1e-12)


def test_topk_without_tail_renormalises():
    s, t = _logps(4)
    bs, bt = D.topk_buckets(s, t, k=3, source="teacher", tail=False)
    torch.testing.assert_close(bs.exp().sum(-1), torch.ones(B, T, dtype=torch.float64), rtol=0, atol=1e-12)
    idx = t.topk(3, -1).indices
    ps = s.exp().gather(-1, idx)
    torch.testing.assert_close(bs.exp(), ps / ps.sum(-1, keepdim=True), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "tv"])
@pytest.mark.parametrize("support", ["full", "topk_teacher", "topk_student"])
def test_gradcheck_wrt_student_logits(name, support):
    g = torch.Generator().manual_seed(5)
    z = torch.randn(1, 2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(1, 2, 5, generator=g, dtype=torch.float64).log_softmax(-1)

    def f(z):
        return D.supported_divergence(z.log_softmax(-1), t, name, support=support, k=2, beta=0.3)

    assert torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-7)


def test_forward_kl_gradient_is_student_minus_teacher_probs():
    s, t = _logps(6)
    z = s.clone().requires_grad_(True)
    D.forward_kl(z.log_softmax(-1), t).sum().backward()
    torch.testing.assert_close(z.grad, s.exp() - t.exp(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("support", ["full", "topk_teacher"])
def test_reverse_kl_pg_value_and_gradient(support):
    s, t = _logps(7)
    z1 = s.clone().requires_grad_(True)
    z2 = s.clone().requires_grad_(True)

    def bucket(z):
        lp = z.log_softmax(-1)
        return D.topk_buckets(lp, t, k=3, source="teacher") if support != "full" else (lp, t)

    exact = D.reverse_kl(*bucket(z1))
    pg = D.reverse_kl_pg(*bucket(z2))
    torch.testing.assert_close(pg, exact.detach(), rtol=1e-12, atol=1e-12)
    exact.sum().backward()
    pg.sum().backward()
    torch.testing.assert_close(z2.grad, z1.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["reverse_kl", "forward_kl", "tv"])
def test_sampled_surrogate_is_unbiased_by_enumeration(name):
    """E_{y ~ p_s}[grad sampled_surrogate(y)] must equal grad of the full-vocab divergence."""
    g = torch.Generator().manual_seed(8)
    z = torch.randn(V, generator=g, dtype=torch.float64)
    t = torch.randn(V, generator=g, dtype=torch.float64).log_softmax(-1)
    zf = z.clone().requires_grad_(True)
    D.divergence(zf.log_softmax(-1)[None, None], t[None, None], name).sum().backward()
    expected = zf.grad
    total = torch.zeros(V, dtype=torch.float64)
    p = z.softmax(-1)
    for y in range(V):
        zy = z.clone().requires_grad_(True)
        lp = zy.log_softmax(-1)
        D.sampled_surrogate(lp[y].reshape(1, 1), t[y].reshape(1, 1), name).sum().backward()
        total += p[y] * zy.grad
    torch.testing.assert_close(total, expected, rtol=1e-9, atol=1e-12)


def test_sampled_reverse_kl_is_the_opd_advantage_form():
    s = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[-0.5, -3.0]], dtype=torch.float64)
    loss = D.sampled_surrogate(s, t, "reverse_kl")
    torch.testing.assert_close(loss.detach(), (s - t).detach() * s.detach())
    loss.sum().backward()
    torch.testing.assert_close(s.grad, torch.tensor([[-0.5, 1.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="no sampled-token form"):
        D.sampled_coefficient(s, t, "jsd")


def test_bad_names_and_k():
    s, t = _logps(9)
    with pytest.raises(ValueError, match="unknown divergence 'kl'"):
        D.divergence(s, t, "kl")
    with pytest.raises(ValueError, match="unknown divergence support"):
        D.supported_divergence(s, t, "tv", support="top")
    with pytest.raises(ValueError, match="k must be in"):
        D.topk_buckets(s, t, k=V + 1)
