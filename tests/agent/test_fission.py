"""Fission-GRPO's forks (tether.agent.fission): the failing step, the replayed prefix (identical tokens and
state, never in the loss), the new groups, and a refused non-deterministic environment."""

from __future__ import annotations

import random

import pytest
import torch

from tether.agent.env import Observation, StepResult
from tether.agent.episodes import run_episodes
from tether.agent.fission import choose_forks, fission, fork_point
from tether.engine.torch_engine import TorchEngine
from tether.models.builtin import tiny_model
from tether.rollout import SamplingParams, Source

pytestmark = pytest.mark.engine
EOS = 2


class ToolEnv:
    """Token-native: an action starting with an even token is an invalid tool call (reply ``[7, k]``, info
    ``invalid``); three turns; reward 1 at the end when the last action ends with EOS. ``noisy``: the reset
    prompt changes from call to call (not restorable)."""
    max_turns = 3

    def __init__(self, noisy: bool = False) -> None:
        self.noisy, self.calls = noisy, 0

    def reset(self, seed: int) -> Observation:
        self.k, self.seed, self.calls, self.actions = 0, seed, self.calls + 1, []
        rng = random.Random(seed)
        return Observation([rng.randrange(10, 90) for _ in range(3)] + ([self.calls] if self.noisy else []),
                           Source.PROMPT)

    def state_id(self):
        return (self.seed, self.k)

    def step(self, action: list[int]) -> StepResult:
        self.k += 1
        self.actions.append(list(action))
        invalid = bool(action) and action[0] % 2 == 0
        if self.k >= 3:
            return StepResult(None, float(action[-1] == EOS), True, {"success": action[-1] == EOS})
        return StepResult(Observation([7, self.k], Source.TOOL), 0.0, False, {"invalid": invalid})


def test_fork_point_reads_the_first_marked_step_or_the_last():
    assert fork_point([False, True, True], 3) == (1, 2)  # the error and its reply are replayed, recovery from turn 2
    assert fork_point([False, False, True], 3) == (2, 2)  # the failing step ended the episode: resample it
    assert fork_point([False, False, False], 3) == (2, 2)  # outcome-only failure: the last step
    assert fork_point([False], 1) == (0, 0)  # a one-turn failure: a fresh group from the reset state
    with pytest.raises(ValueError, match="at least one turn"):
        fork_point([], 0)


def _play(engine, envs, seeds, groups, replays=None, salt=0):
    return run_episodes(engine, envs, seeds, SamplingParams(max_new_tokens=3), group_B=groups,
                        seed_fn=lambda k, c: 100 * salt + 10 * k + c, max_turns=3, max_episode_tokens=64,
                        replays=replays)


def test_forked_groups_start_from_the_failed_rows_prefix_and_state():
    model, _ = tiny_model(0)
    engine = TorchEngine(model, eos_id=EOS, pad_id=0, copy=True)
    seeds = [s for s in range(6) for _ in range(2)]
    groups = torch.arange(6).repeat_interleave(2)
    base_envs = [ToolEnv() for _ in seeds]
    base = _play(engine, base_envs, seeds, groups)
    forks = choose_forks(base)
    assert forks and len({int(groups[f.row]) for f in forks}) == len(forks)  # one per group
    assert any(bool(base.failure_EK[f.row].any()) for f in forks)  # some fork reads an invalid tool call
    fork_envs = []

    def run(s, r, g):
        fork_envs.extend(ToolEnv() for _ in s)
        return _play(engine, fork_envs, s, g, r, salt=1)

    out = fission(base, seeds, 3, run, pad_id=0, vocab_size=engine.vocab_size)
    B = base.rollout.batch_size
    assert out.fission_B.tolist() == [False] * B + [True] * (3 * len(forks))
    r, o = out.rollout, base.rollout
    assert r.group_B[B:].tolist() == [int(groups.max()) + 1 + i for i in range(len(forks)) for _ in range(3)]
    for i, f in enumerate(forks):
        spans = base.action_spans[f.row]
        end = spans[f.replayed][0]
        for j in range(3):
            e = B + 3 * i + j
            assert r.tokens_BT[e, :end].tolist() == o.tokens_BT[f.row, :end].tolist()  # the identical token prefix
            assert not r.loss_mask_BT[e, :end].any()  # the replayed prefix is context, never trained on
            for a, b in spans[:f.replayed]:
                assert set(r.source_BT[e, a:b].tolist()) == {int(Source.REPLAY)}
                assert torch.equal(r.logp_mu_BT[e, a:b], o.logp_mu_BT[f.row, a:b])  # original provenance kept
            # the same state: the forked environment was reset with the failed episode's seed and stepped with its
            # actions, then went on from there
            env, orig = fork_envs[3 * i + j], base_envs[f.row]
            assert env.seed == orig.seed and env.actions[:f.replayed] == orig.actions[:f.replayed]
            assert len(env.actions) == f.replayed + int((r.turn_BT[e][r.loss_mask_BT[e]]).unique().numel())
            assert (r.turn_BT[e][r.loss_mask_BT[e]] >= f.replayed).all()  # turn indices continue
            assert out.replayed_EK[e].sum() == f.replayed
            assert torch.equal(out.rewards_EK[e, :f.replayed], base.rewards_EK[f.row, :f.replayed])
    assert out.metrics()["agent/fission_rows"] == 3 * len(forks)


def test_a_non_restorable_environment_is_refused_by_name():
    model, _ = tiny_model(0)
    engine = TorchEngine(model, eos_id=EOS, pad_id=0, copy=True)
    envs = [ToolEnv(noisy=True) for _ in range(4)]
    base = _play(engine, envs, [0, 0, 1, 1], torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="ToolEnv is not deterministic under reset"):
        fission(base, [0, 0, 1, 1], 2, lambda s, r, g: _play(engine, [envs[i % 4] for i in range(len(s))], s, g, r),
                pad_id=0, vocab_size=engine.vocab_size)
