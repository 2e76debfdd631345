"""Advantage estimators vs slow loop references."""

import statistics

import pytest
import torch

from tether.objectives.advantages import ADVANTAGES, broadcast_to_tokens, get_advantage

pytestmark = pytest.mark.unit


def ref(name, rewards, groups, include):
    B = len(rewards)
    out = []
    for i in range(B):
        members = [j for j in range(B) if groups[j] == groups[i] and include[j]]
        vals = [rewards[j] for j in members]
        r = rewards[i]
        if name == "grpo":
            if len(vals) <= 1:
                out.append((r - 0.0) / (1.0 + 1e-6))
            else:
                out.append((r - statistics.mean(vals)) / (statistics.stdev(vals) + 1e-6))
        elif name in ("dr_grpo", "reinforce_pp"):
            out.append(r - (statistics.mean(vals) if len(vals) > 1 else 0.0))
        elif name == "rloo":
            others = [rewards[j] for j in members if j != i]
            out.append(r - statistics.mean(others) if others else 0.0)
    if name == "reinforce_pp":
        sel = [out[i] for i in range(B) if include[i]]
        mu = statistics.mean(sel)
        sd = statistics.stdev(sel) if len(sel) > 1 else 1.0
        out = [(a - mu) / (sd + 1e-6) for a in out]
    return out


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("with_include", [False, True])
def test_matches_loop_reference(name, seed, with_include):
    g = torch.Generator().manual_seed(seed)
    B = 23
    groups = torch.randint(0, 6, (B,), generator=g) * 7  # unordered, unequal sizes, non-contiguous ids
    groups[-1] = 999  # a singleton group
    rewards = torch.randn(B, generator=g, dtype=torch.float64)
    rewards[:4] = 1.0  # ties
    include = torch.rand(B, generator=g) > 0.25 if with_include else torch.ones(B, dtype=torch.bool)
    got = get_advantage(name)(rewards, groups, include if with_include else None)
    want = ref(name, rewards.tolist(), groups.tolist(), include.tolist())
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-9)


def test_all_equal_rewards_give_zero_advantage():
    r = torch.ones(8, dtype=torch.float64)
    grp = torch.tensor([0] * 4 + [1] * 4)
    for name in ADVANTAGES:
        assert torch.all(get_advantage(name)(r, grp).abs() < 1e-9), name


def test_singleton_group_grpo_is_reward():
    got = get_advantage("grpo")(torch.tensor([0.7], dtype=torch.float64), torch.tensor([3]))
    assert got.item() == pytest.approx(0.7 / (1 + 1e-6), rel=1e-12)


def test_unknown_and_bad_shapes():
    with pytest.raises(ValueError, match="grpo"):
        get_advantage("ppo")
    with pytest.raises(ValueError, match="group_B"):
        get_advantage("grpo")(torch.zeros(3), torch.zeros(4, dtype=torch.long))


def test_broadcast_to_tokens():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    out = broadcast_to_tokens(torch.tensor([2.0, -1.0]), mask)
    assert out.tolist() == [[2.0, 2.0, 0.0], [0.0, 0.0, 0.0]]
