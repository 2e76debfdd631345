import math

import pytest
import torch

from tether.engine.sampling import (
    entropy_from_logprobs,
    replay_logprobs,
    sample_from_logprobs,
    sampling_logprobs,
)

pytestmark = pytest.mark.unit


def reference(logits, temperature, top_k, top_p):
    """Loop reference: per row, sort with ties by lower id, cut top-k, renormalise, cut top-p."""
    out, kept_counts = [], []
    for row in logits.tolist():
        V = len(row)
        s = [x / temperature for x in row]
        order = sorted(range(V), key=lambda i: (-s[i], i))
        k = V if top_k is None else min(top_k, V)
        kept = order[:k]
        if top_p is not None and top_p < 1.0:
            m = max(s[i] for i in kept)
            z = sum(math.exp(s[i] - m) for i in kept)
            mass, cut = 0.0, 0
            for i in kept:
                if mass < top_p:
                    cut += 1
                mass += math.exp(s[i] - m) / z
            kept = kept[:max(cut, 1)]
        m = max(s[i] for i in kept)
        lse = m + math.log(sum(math.exp(s[i] - m) for i in kept))
        lp = [float("-inf")] * V
        for i in kept:
            lp[i] = s[i] - lse
        out.append(lp)
        kept_counts.append(len(kept))
    return torch.tensor(out, dtype=torch.float64), torch.tensor(kept_counts)


def close_with_inf(a, b):
    assert torch.equal(torch.isinf(a), torch.isinf(b))
    fin = torch.isfinite(b)
    torch.testing.assert_close(a[fin], b[fin], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 1.7])
@pytest.mark.parametrize("top_k", [None, 1, 3, 50])
@pytest.mark.parametrize("top_p", [None, 0.5, 0.9, 1.0])
def test_sampling_logprobs_matches_loop_reference(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(6, 11, generator=g, dtype=torch.float64) * 3
    logits[0, 3] = logits[0, 7] = logits[0].max() + 1  # a tie at the top
    logits[1] = 0.0  # a row of all ties
    logits[2, 0] = 50.0  # extreme logit
    lp, kept = sampling_logprobs(logits, temperature, top_k, top_p)
    ref_lp, ref_kept = reference(logits, temperature, top_k, top_p)
    assert torch.equal(kept, ref_kept)
    close_with_inf(lp, ref_lp)
    close_with_inf(replay_logprobs(logits, temperature, kept), ref_lp)


def test_ties_keep_lower_ids():
    logits = torch.zeros(1, 5, dtype=torch.float64)
    lp, kept = sampling_logprobs(logits, 1.0, top_k=2)
    assert kept.tolist() == [2]
    assert torch.isfinite(lp[0, :2]).all() and torch.isinf(lp[0, 2:]).all()
    torch.testing.assert_close(lp[0, :2].exp(), torch.full((2,), 0.5, dtype=torch.float64))


def test_replay_leading_dims_and_no_truncation():
    logits = torch.randn(2, 3, 7, dtype=torch.float64)
    lp, kept = sampling_logprobs(logits, 0.8, top_k=None, top_p=None)
    assert (kept == 7).all()
    torch.testing.assert_close(replay_logprobs(logits, 0.8, None), lp)
    torch.testing.assert_close(replay_logprobs(logits, 0.8, kept), lp)
    lp2, kept2 = sampling_logprobs(logits, 0.8, top_k=4, top_p=0.8)
    assert kept2.shape == (2, 3)
    close_with_inf(replay_logprobs(logits, 0.8, kept2), lp2)


def test_replay_rejects_bad_counts():
    with pytest.raises(ValueError, match="kept_count"):
        replay_logprobs(torch.zeros(2, 4), 1.0, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        replay_logprobs(torch.zeros(2, 4), 1.0, torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match="temperature"):
        sampling_logprobs(torch.zeros(2, 4), 0.0)


def test_entropy_reference():
    logits = torch.randn(4, 9, dtype=torch.float64)
    lp, _ = sampling_logprobs(logits, 1.0, top_k=3)
    H = entropy_from_logprobs(lp)
    for b in range(4):
        ref = -sum(math.exp(x) * x for x in lp[b].tolist() if x != float("-inf"))
        assert abs(H[b].item() - ref) < 1e-12


def test_sampler_frequencies_and_support():
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64)
    lp = probs.log().expand(20000, 4).contiguous()
    tok = sample_from_logprobs(lp, torch.Generator().manual_seed(0))
    freq = torch.bincount(tok, minlength=4).double() / 20000
    assert freq[3] == 0
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)
    tok2 = sample_from_logprobs(lp, torch.Generator().manual_seed(0))
    assert torch.equal(tok, tok2)
