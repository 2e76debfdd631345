"""The engine-check classifier (tether.engine.conformance) on synthetic log-prob arrays: each candidate
against a slow per-token reference, and the verdict for each case an engine can be in (sampled, raw,
off by one either way, none, ambiguous)."""

from __future__ import annotations

import math

import pytest
import torch

from tether.engine.conformance import (
    AMBIGUOUS,
    NONE,
    SAMPLED,
    candidate_logprobs,
    classify_logprobs,
    max_abs_diff,
)

B, N, V = 3, 7, 13
TAU, K, P = 0.7, 6, 0.8


def slow_logprob(z: list[float], x: int, tau: float, top_k: int | None, top_p: float | None) -> float:
    """log mu(x): scale, keep the top-k (lower id first on ties), then the shortest prefix whose mass reaches top_p."""
    s = [v / tau for v in z]
    order = sorted(range(len(s)), key=lambda i: (-s[i], i))
    kept = order[:top_k] if top_k is not None else order
    if top_p is not None:
        lse = math.log(sum(math.exp(s[i]) for i in kept))
        mass, prefix = 0.0, []
        for i in kept:
            if mass >= top_p:
                break
            prefix.append(i)
            mass += math.exp(s[i] - lse)
        kept = prefix
    if x not in kept:
        return float("-inf")
    return s[x] - math.log(sum(math.exp(s[i]) for i in kept))


@pytest.fixture
def case():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, N, V, generator=g, dtype=torch.float64) * 2
    tokens = logits.argsort(-1, descending=True)[..., 1]  # the second most likely token: inside the kept set
    return logits, tokens


def slow(logits, tokens, tau, k, p):
    return torch.tensor([[slow_logprob(logits[b, j].tolist(), int(tokens[b, j]), tau, k, p) for j in range(N)]
                         for b in range(B)], dtype=torch.float64)


def test_candidates_match_a_slow_per_token_reference(case):
    logits, tokens = case
    c = candidate_logprobs(logits, tokens, temperature=TAU, top_k=K, top_p=P)
    sampled, raw = slow(logits, tokens, TAU, K, P), slow(logits, tokens, 1.0, None, None)
    tempered = slow(logits, tokens, TAU, None, None)
    torch.testing.assert_close(c[SAMPLED].double(), sampled, rtol=0, atol=1e-5)
    torch.testing.assert_close(c["tempered"].double(), tempered, rtol=0, atol=1e-5)
    torch.testing.assert_close(c["raw"].double(), raw, rtol=0, atol=1e-5)
    torch.testing.assert_close(c["sampled-shift-prev"][:, 1:].double(), sampled[:, :-1], rtol=0, atol=1e-5)
    torch.testing.assert_close(c["raw-shift-next"][:, :-1].double(), raw[:, 1:], rtol=0, atol=1e-5)
    for name in ("sampled-shift-prev", "raw-shift-prev"):
        assert torch.isnan(c[name][:, 0]).all()
    for name in ("sampled-shift-next", "raw-shift-next"):
        assert torch.isnan(c[name][:, -1]).all()


@pytest.mark.parametrize("name, build", [
    ("sampled", lambda s, r: s),
    ("raw", lambda s, r: r),
    ("sampled-shift-prev", lambda s, r: torch.cat([torch.zeros(B, 1, dtype=s.dtype), s[:, :-1]], 1)),  # x_i gets x_{i-1}'s
    ("sampled-shift-next", lambda s, r: torch.cat([s[:, 1:], torch.zeros(B, 1, dtype=s.dtype)], 1)),
    ("raw-shift-prev", lambda s, r: torch.cat([torch.full((B, 1), -3.0, dtype=s.dtype), r[:, :-1]], 1)),
])
def test_each_case_is_recognised(case, name, build):
    logits, tokens = case
    returned = build(slow(logits, tokens, TAU, K, P), slow(logits, tokens, 1.0, None, None)).float()
    v = classify_logprobs(returned, candidate_logprobs(logits, tokens, temperature=TAU, top_k=K, top_p=P), tol=1e-4)
    assert (v.kind, v.matches) == (name, (name,))
    assert v.max_abs_diff[name] <= 1e-4
    assert all(d > 1e-2 for n, d in v.max_abs_diff.items() if n != name)


def test_raw_and_processed_are_told_apart_by_temperature_alone(case):
    logits, tokens = case
    returned = slow(logits, tokens, 1.0, None, None)
    cands = candidate_logprobs(logits, tokens, temperature=0.5)
    assert classify_logprobs(returned, cands, tol=1e-6).kind == "raw"
    returned = slow(logits, tokens, 0.5, None, None)
    v = classify_logprobs(returned, cands, tol=1e-6)  # no truncation: sampled and tempered coincide
    assert v.kind == AMBIGUOUS and set(v.matches) == {SAMPLED, "tempered"}


def test_noise_beyond_tolerance_is_none_and_identical_candidates_are_ambiguous(case):
    logits, tokens = case
    cands = candidate_logprobs(logits, tokens, temperature=TAU, top_k=K, top_p=P)
    noisy = cands[SAMPLED] + 1e-3 * torch.randn(cands[SAMPLED].shape, generator=torch.Generator().manual_seed(1))
    v = classify_logprobs(noisy, cands, tol=1e-4)
    assert v.kind == NONE and v.matches == ()
    assert classify_logprobs(noisy, cands, tol=1e-2).kind == SAMPLED
    plain = candidate_logprobs(logits, tokens, temperature=1.0)  # no transform: sampled == tempered == raw
    v = classify_logprobs(plain["raw"], plain, tol=1e-6)
    assert v.kind == AMBIGUOUS and set(v.matches) == {SAMPLED, "tempered", "raw"}


def test_max_abs_diff_edge_cases():
    inf = float("inf")
    assert max_abs_diff(torch.tensor([-inf, -1.0]), torch.tensor([-inf, -1.5])) == 0.5
    assert max_abs_diff(torch.tensor([-1.0, -2.0]), torch.tensor([-1.0, float("nan")])) == 0.0
    assert max_abs_diff(torch.tensor([-1.0]), torch.tensor([float("nan")])) == inf
    assert max_abs_diff(torch.tensor([float("nan")]), torch.tensor([-1.0])) == inf
    assert max_abs_diff(torch.tensor([-1.0]), torch.tensor([-inf])) == inf
    with pytest.raises(ValueError, match="shape"):
        max_abs_diff(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="tol"):
        classify_logprobs(torch.zeros(1), {"a": torch.zeros(1)}, tol=-1)
    with pytest.raises(ValueError, match="no candidates"):
        classify_logprobs(torch.zeros(1), {}, tol=0)
    with pytest.raises(ValueError, match="at least two tokens"):
        candidate_logprobs(torch.zeros(1, 1, 3), torch.zeros(1, 1, dtype=torch.long), temperature=1.0)
    with pytest.raises(ValueError, match=r"\[B, N, V\]"):
        candidate_logprobs(torch.zeros(1, 2, 3), torch.zeros(1, 3, dtype=torch.long), temperature=1.0)
