"""DART's curation switches (tether.agent.dart): each pure function against a slow loop written from its docstring."""

from __future__ import annotations

import math
import random

import pytest
import torch

from tether.agent.dart import (
    SuccessHistory,
    allocate_rollouts,
    entropy_selection,
    mask_turns,
    select_high_entropy,
    turn_entropy,
)
from tether.rollout import Rollout, Source


def _record(seed: int, B: int = 3, T: int = 14, K: int = 3) -> tuple[Rollout, torch.Tensor]:
    """A random multi-turn record: prompt, then K turns of (policy action, env reply), some turns missing."""
    g = torch.Generator().manual_seed(seed)
    source = torch.full((B, T), int(Source.PAD), dtype=torch.int8)
    turn = torch.full((B, T), -1, dtype=torch.long)
    lengths = []
    for b in range(B):
        t = 2
        source[b, :t] = int(Source.PROMPT)
        for k in range(int(torch.randint(1, K + 1, (1,), generator=g))):
            n_act, n_env = int(torch.randint(1, 3, (1,), generator=g)), int(torch.randint(0, 2, (1,), generator=g))
            if t + n_act + n_env > T:
                break
            src = Source.CACHE if (b == 2 and k == 0) else Source.POLICY
            source[b, t:t + n_act] = int(src)
            source[b, t + n_act:t + n_act + n_env] = int(Source.ENV)
            turn[b, t:t + n_act + n_env] = k
            t += n_act + n_env
        lengths.append(t)
    L = torch.tensor(lengths)
    r = Rollout(tokens_BT=torch.randint(0, 9, (B, T), generator=g), prompt_len_B=torch.full((B,), 2),
                completion_len_B=L - 2, logp_mu_BT=torch.zeros(B, T), version_BT=torch.zeros(B, T, dtype=torch.long),
                source_BT=source, turn_BT=turn)
    return r, torch.rand(B, T, generator=g, dtype=torch.float64) * 3


def _loop_turn_entropy(ent, mask, turn, K):
    B, T = mask.shape
    mean = [[0.0] * K for _ in range(B)]
    count = [[0] * K for _ in range(B)]
    for b in range(B):
        for k in range(K):
            vals = [float(ent[b, t]) for t in range(T) if mask[b, t] and int(turn[b, t]) == k]
            count[b][k] = len(vals)
            mean[b][k] = sum(vals) / len(vals) if vals else 0.0
    return mean, count


@pytest.mark.parametrize("seed", range(6))
def test_turn_entropy_matches_a_loop(seed):
    r, ent = _record(seed)
    mean, count = turn_entropy(ent, r.loss_mask_BT, r.turn_BT, 3)
    ref_mean, ref_count = _loop_turn_entropy(ent, r.loss_mask_BT, r.turn_BT, 3)
    assert count.tolist() == ref_count
    assert torch.allclose(mean, torch.tensor(ref_mean, dtype=torch.float64), rtol=0, atol=1e-12)


def _loop_select(mean, valid, fraction):
    entries = [(float(mean[e][k]), e * len(mean[0]) + k) for e in range(len(mean)) for k in range(len(mean[0]))
               if valid[e][k]]
    n = math.ceil(fraction * len(entries) - 1e-9) if entries else 0
    chosen = {i for _, i in sorted(entries, key=lambda x: (-x[0], x[1]))[:max(n, 1 if entries else 0)]}
    return [[(e * len(mean[0]) + k) in chosen for k in range(len(mean[0]))] for e in range(len(mean))]


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 0.7, 1.0])
def test_select_high_entropy_matches_a_loop_with_ties(fraction):
    rng = random.Random(int(fraction * 100))
    for _ in range(20):
        E, K = rng.randint(1, 5), rng.randint(1, 4)
        mean = [[rng.choice([0.0, 0.5, 1.0, rng.random()]) for _ in range(K)] for _ in range(E)]  # many ties
        valid = [[rng.random() < 0.7 for _ in range(K)] for _ in range(E)]
        got = select_high_entropy(torch.tensor(mean), torch.tensor(valid), fraction)
        assert got.tolist() == _loop_select(mean, valid, fraction)


def test_select_high_entropy_refuses_a_bad_fraction():
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction must be in"):
            select_high_entropy(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), bad)


def test_mask_turns_takes_only_the_dropped_turns_out_of_the_loss():
    r, _ = _record(3)
    keep = torch.tensor([[True, False, True], [False, True, True], [False, True, False]])
    out = mask_turns(r, keep)
    for b in range(3):
        for t in range(r.tokens_BT.shape[1]):
            k = int(r.turn_BT[b, t])
            was = bool(r.loss_mask_BT[b, t])
            assert bool(out.loss_mask_BT[b, t]) == (was and bool(keep[b, k]))
            if was and not keep[b, k]:
                assert int(out.source_BT[b, t]) == Source.REPLAY
            else:
                assert int(out.source_BT[b, t]) == int(r.source_BT[b, t])
    assert torch.equal(out.tokens_BT, r.tokens_BT)
    with pytest.raises(ValueError, match="no provenance"):
        mask_turns(Rollout(tokens_BT=r.tokens_BT, prompt_len_B=r.prompt_len_B, completion_len_B=r.completion_len_B,
                           logp_mu_BT=r.logp_mu_BT, version_BT=r.version_BT), keep)


def test_entropy_selection_keeps_the_top_steps_and_reports_them():
    r, ent = _record(5)
    out, m = entropy_selection(r, ent, 0.5)
    mean, count = turn_entropy(ent, r.loss_mask_BT, r.turn_BT, 3)
    n = int((count > 0).sum())
    assert m["dart/steps"] == n and m["dart/kept_steps"] == math.ceil(n / 2)
    kept_mean, _ = turn_entropy(ent, out.loss_mask_BT, out.turn_BT, 3)
    _, kept_count = turn_entropy(ent, out.loss_mask_BT, out.turn_BT, 3)
    kept = kept_count > 0
    dropped = (count > 0) & ~kept
    assert float(mean[kept].min()) >= float(mean[dropped].max())  # every kept step at least as uncertain
    assert m["dart/kept_token_frac"] == pytest.approx(float(out.loss_mask_BT.sum()) / float(r.loss_mask_BT.sum()))
    assert m["dart/kept_entropy_mean"] >= m["dart/dropped_entropy_mean"]


def _greedy_reference(rates, total, lo, hi):
    """The docstring's rule written as plainly as possible: one episode at a time."""
    w = [0.25 if p is None else p * (1 - p) for p in rates]
    c = [lo] * len(rates)
    rr = 0
    while sum(c) < total:
        cands = [i for i in range(len(c)) if c[i] < hi]
        scores = {i: w[i] / (c[i] - lo + 1) for i in cands}
        top = max(scores.values())
        if top <= 0:
            i = cands[rr % len(cands)]
            rr += 1
        else:
            i = min(i for i in cands if scores[i] == top)
        c[i] += 1
    return c


def test_allocate_rollouts_by_success_rate():
    # a task near 50 % gets the most, solved (1.0) and hopeless (0.0) tasks the minimum
    assert allocate_rollouts([1.0, 0.5, 0.0, 0.5], 16, 2, 8) == [2, 6, 2, 6]
    assert allocate_rollouts([None, None, None], 9, 2, 6) == [3, 3, 3]  # no history: uniform
    assert allocate_rollouts([0.5, 0.9], 8, 2, 5) == [5, 3]  # the cap
    assert allocate_rollouts([1.0, 0.0], 6, 2, 6) == [3, 3]  # nothing informative: evenly
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 5)
        lo = rng.randint(1, 3)
        hi = rng.randint(lo, 8)
        total = rng.randint(n * lo, n * hi)
        rates = [rng.choice([None, 0.0, 1.0, 0.5, rng.random()]) for _ in range(n)]
        got = allocate_rollouts(rates, total, lo, hi)
        assert got == _greedy_reference(rates, total, lo, hi)
        assert sum(got) == total and all(lo <= c <= hi for c in got)


def test_allocate_rollouts_refuses_impossible_bounds():
    with pytest.raises(ValueError, match="cannot share"):
        allocate_rollouts([0.5, 0.5], 3, 2, 4)
    with pytest.raises(ValueError, match="cannot share"):
        allocate_rollouts([0.5], 9, 2, 4)
    with pytest.raises(ValueError, match="success rate"):
        allocate_rollouts([1.5], 2, 2, 4)


def test_success_history_keeps_a_window_and_round_trips():
    h = SuccessHistory(3)
    assert h.rate(7) is None
    for ok in (True, False, False, True):
        h.add(7, ok)
    assert h.rate(7) == pytest.approx(1 / 3)  # the last 3: False, False, True
    h2 = SuccessHistory(1)
    h2.load_state_dict(h.state_dict())
    assert h2.rate(7) == h.rate(7) and h2.window == 3
    with pytest.raises(ValueError, match="window"):
        SuccessHistory(0)
