"""Turn-level credit estimators against slow python-loop references (tether.agent.credit)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from tether.agent.credit import BASELINES, CREDIT, get_credit
from tether.objectives.advantages import dr_grpo, grpo, rloo

EPS = 1e-6


def batch(seed: int, E: int = 23, K: int = 5, groups: int = 5, states: int = 4, ties: bool = True):
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(1, K + 1, (E,), generator=g)
    mask = torch.arange(K)[None, :] < n[:, None]
    if ties:
        r = torch.randint(0, 3, (E, K), generator=g).float() / 2
    else:
        r = torch.randn(E, K, generator=g)
    r = r * mask
    group = torch.randint(0, groups, (E,), generator=g) * 7 + 3
    group[-1] = 1000  # a singleton group
    state = torch.randint(0, states, (E, K), generator=g) * mask
    return r, mask, group, state


# ---- the loop references: lists and dicts only ----

def ref_rtg(r, n, gamma):
    return [sum(gamma ** (j - k) * r[j] for j in range(k, n)) for k in range(n)]


def ref_centre(entries, baseline, lone="raw", scale=None):
    """entries: list of (key, episode, value) -> list of advantages, in order."""
    out = []
    for key, ep, x in entries:
        cell = [v for kk, _, v in entries if kk == key]
        if baseline == "loo":
            others = [v for kk, e2, v in entries if kk == key and e2 != ep]
            out.append(x - sum(others) / len(others) if others else 0.0)
            continue
        if len(cell) == 1:
            if lone == "zero":
                out.append(0.0)
                continue
            mean, sd = 0.0, 1.0
        else:
            mean, sd = sum(cell) / len(cell), statistics.stdev(cell)
        if scale is not None:
            sd = scale[key]
        out.append(x - mean if baseline == "mean" else (x - mean) / (sd + EPS))
    return out


def ref(name, r_EK, mask_EK, group_E, state_EK, gamma, omega, baseline):
    r = r_EK.double().tolist()
    n = mask_EK.sum(1).tolist()
    g = group_E.tolist()
    s = state_EK.tolist()
    E, K = r_EK.shape
    A = [[0.0] * K for _ in range(E)]
    G = [ref_rtg(r[e], n[e], gamma) for e in range(E)]
    R = [sum(r[e][:n[e]]) for e in range(E)]
    ep_adv = ref_centre([(g[e], e, R[e]) for e in range(E)], baseline)
    if name == "episode":
        for e in range(E):
            for k in range(n[e]):
                A[e][k] = ep_adv[e]
    elif name in ("turn", "discounted", "gigpo"):
        cells = [(e, k) for e in range(E) for k in range(n[e])]
        key = {"turn": lambda e, k: (g[e], k), "discounted": lambda e, k: g[e],
               "gigpo": lambda e, k: (g[e], s[e][k])}[name]
        vals = ref_centre([(key(e, k), e, G[e][k]) for e, k in cells], baseline,
                          lone="zero" if name == "gigpo" else "raw")
        for (e, k), v in zip(cells, vals):
            A[e][k] = ep_adv[e] + omega * v if name == "gigpo" else v
    elif name == "turn_unbiased":
        cells = [(e, k) for e in range(E) for k in range(K)]
        padded = {(e, k): (G[e][k] if k < n[e] else 0.0) for e, k in cells}
        scale = None
        if baseline == "std":
            scale = {}
            for e, k in cells:
                rs = [R[j] for j in range(E) if g[j] == g[e]]
                scale[(g[e], k)] = statistics.stdev(rs) if len(rs) > 1 else 1.0
        vals = ref_centre([((g[e], k), e, padded[(e, k)]) for e, k in cells], baseline, scale=scale)
        for (e, k), v in zip(cells, vals):
            if k < n[e]:
                A[e][k] = v
    return torch.tensor(A, dtype=torch.float64)


@pytest.mark.parametrize("name", list(CREDIT))
@pytest.mark.parametrize("baseline", [None, *BASELINES])
@pytest.mark.parametrize("seed,gamma,ties", [(0, 1.0, True), (1, 0.9, False), (2, 0.5, True)])
def test_matches_loop_reference(name, baseline, seed, gamma, ties):
    r, mask, group, state = batch(seed, ties=ties)
    omega = 0.7
    got = CREDIT[name](r.double(), mask, group, state, gamma=gamma, omega=omega, baseline=baseline)
    default = {"turn_unbiased": "mean"}.get(name, "std")
    want = ref(name, r, mask, group, state, gamma, omega, baseline or default)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert (got[~mask] == 0).all()
    assert got.dtype == torch.float64
    assert CREDIT[name](r, mask, group, state, gamma=gamma, omega=omega, baseline=baseline).dtype == torch.float32


def test_episode_is_tethers_grpo_dr_grpo_rloo_of_the_returns():
    r, mask, group, state = batch(3)
    R = r.sum(1)
    for baseline, fn in (("std", grpo), ("mean", dr_grpo), ("loo", rloo)):
        got = CREDIT["episode"](r, mask, group, baseline=baseline)
        torch.testing.assert_close(got, fn(R, group)[:, None] * mask, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(CREDIT))
def test_padded_turns_exactly_zero_even_with_garbage_rewards(name):
    r, mask, group, state = batch(4, ties=False)
    dirty = r.clone()
    dirty[~mask] = 123.0  # rewards on padded turns must be ignored
    got = CREDIT[name](dirty, mask, group, state)
    assert (got[~mask] == 0).all()
    torch.testing.assert_close(got, CREDIT[name](r, mask, group, state))


def test_invariances():
    r, mask, group, state = batch(5, ties=False)
    shift = torch.randn(int(group.max()) + 1)[group]
    # a constant per group added to every episode's return (on its first turn) leaves `episode` unchanged
    r2 = r.clone()
    r2[:, 0] += shift
    # (a singleton group has no baseline: its advantage is its return)
    grouped = group != 1000
    torch.testing.assert_close(CREDIT["episode"](r2, mask, group)[grouped], CREDIT["episode"](r, mask, group)[grouped],
                               atol=1e-5, rtol=0)
    for name in ("episode", "turn_unbiased"):
        for baseline in ("mean", "loo"):
            torch.testing.assert_close(CREDIT[name](r2, mask, group, baseline=baseline)[grouped],
                                       CREDIT[name](r, mask, group, baseline=baseline)[grouped], atol=1e-5, rtol=0)
    # a positive scale of all rewards leaves the std-normalised group estimators unchanged (up to eps)
    for name in ("episode", "discounted"):
        torch.testing.assert_close(CREDIT[name](3 * r, mask, group, state, gamma=0.9)[grouped],
                                   CREDIT[name](r, mask, group, state, gamma=0.9)[grouped], atol=1e-4, rtol=0)
    # permuting episodes permutes the advantages
    p = torch.randperm(r.shape[0], generator=torch.Generator().manual_seed(0))
    for name in CREDIT:
        torch.testing.assert_close(CREDIT[name](r[p], mask[p], group[p], state[p]),
                                   CREDIT[name](r, mask, group, state)[p])
    # relabelling groups and states changes nothing
    for name in CREDIT:
        torch.testing.assert_close(CREDIT[name](r, mask, group * 5 - 2, state * 3 + 11),
                                   CREDIT[name](r, mask, group, state))


def test_single_turn_episodes_reduce_to_episode_grpo_and_gigpo_singletons_give_the_episode_term():
    r, mask, group, state = batch(6, K=1)
    ep = CREDIT["episode"](r, mask, group)
    for name in ("turn", "discounted"):
        torch.testing.assert_close(CREDIT[name](r, mask, group, state), ep)
    unique_state = torch.arange(r.numel()).view_as(r)
    torch.testing.assert_close(CREDIT["gigpo"](r, mask, group, unique_state, omega=2.0), ep)


def test_hand_example():
    # one group, two episodes: e0 stops after one turn (reward 1), e1 takes two turns (0.5, 1)
    r = torch.tensor([[1.0, 0.0], [0.5, 1.0]])
    mask = torch.tensor([[True, False], [True, True]])
    group = torch.zeros(2, dtype=torch.long)
    # returns 1 and 1.5: GRPO std = sqrt(0.125)
    a = 0.25 / (math.sqrt(0.125) + EPS)
    torch.testing.assert_close(CREDIT["episode"](r, mask, group), torch.tensor([[-a, 0.0], [a, a]]))
    # turn 1 exists only for e1: a lone cell keeps its return (GRPO convention)
    torch.testing.assert_close(CREDIT["turn"](r, mask, group), torch.tensor([[-a, 0.0], [a, 1.0]]))
    # all episodes stay in the turn-1 cell (e0 with 0): baseline 0.5, so e1's turn 1 gets 0.5
    torch.testing.assert_close(CREDIT["turn_unbiased"](r, mask, group), torch.tensor([[-0.25, 0.0], [0.25, 0.5]]))
    torch.testing.assert_close(CREDIT["turn_unbiased"](r, mask, group, baseline="loo"),
                               torch.tensor([[-0.5, 0.0], [0.5, 1.0]]))


def test_rejects_bad_inputs():
    r, mask, group, state = batch(7)
    with pytest.raises(ValueError, match="gigpo needs state_EK"):
        CREDIT["gigpo"](r, mask, group)
    bad = mask.clone()
    bad[0] = torch.tensor([False, True, False, False, False])
    with pytest.raises(ValueError, match="prefix"):
        CREDIT["turn"](r, bad, group)
    with pytest.raises(ValueError, match="valid: std"):
        CREDIT["turn"](r, mask, group, baseline="nope")
    with pytest.raises(ValueError, match="group_E"):
        CREDIT["episode"](r, mask, group[:-1])
    with pytest.raises(ValueError, match="valid: episode"):
        get_credit("nope")
