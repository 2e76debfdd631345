"""The multi-turn rollout: provenance per token, masks from provenance only, outcomes, determinism."""

from __future__ import annotations

import random

import pytest
import torch

from tether.agent.env import Observation, StepResult
from tether.agent.episodes import broadcast_turns, run_episodes
from tether.engine.torch_engine import TorchEngine
from tether.models.builtin import tiny_model
from tether.models.logprobs import token_logprobs
from tether.objectives import get_preset
from tether.objectives.inputs import LossInputs
from tether.rollout import SamplingParams, Source

pytestmark = pytest.mark.engine

EOS = 2


class EchoEnv:
    """Token-native toy: the reply is the action's length as one token plus a fixed tail; rewards 1 when an
    action ends with EOS. Replies alternate env / tool; ``fail_at`` raises at that turn."""

    def __init__(self, turns: int = 3, reply_len: int = 2, fail_at: int | None = None) -> None:
        self.turns, self.reply_len, self.fail_at = turns, reply_len, fail_at
        self.max_turns = turns

    def reset(self, seed: int) -> Observation:
        self.k, self.seed = 0, seed
        rng = random.Random(seed)
        return Observation([rng.randrange(3, 99) for _ in range(1 + seed % 4)], Source.PROMPT)

    def step(self, action: list[int]) -> StepResult:
        if self.k == self.fail_at:
            raise RuntimeError("boom")
        self.k += 1
        reward = float(bool(action) and action[-1] == EOS)
        reply = [3 + len(action)] + [EOS] * (self.reply_len - 1)  # EOS ids inside a reply: still not policy
        src = Source.TOOL if self.k % 2 else Source.ENV
        done = self.k >= self.turns
        return StepResult(None if done else Observation(reply, src), reward, done, {"state": self.k})


def _engine(seed: int = 0, pad_id: int = 0):
    model, _ = tiny_model(seed)
    return model, TorchEngine(model, eos_id=EOS, pad_id=pad_id, copy=True)


def _run(engine, envs, seeds, *, max_new=4, max_turns=5, budget=200, seed=0, params=None):
    groups = torch.arange(len(envs)) // 2
    return run_episodes(engine, envs, seeds, params or SamplingParams(max_new_tokens=max_new), group_B=groups,
                        seed_fn=lambda k, c: 1000 * seed + 10 * k + c, max_turns=max_turns, max_episode_tokens=budget)


def test_row_is_prompt_then_actions_and_replies_with_provenance():
    _, engine = _engine()
    envs = [EchoEnv() for _ in range(4)]
    batch = _run(engine, envs, [0, 1, 2, 3])
    r = batch.rollout
    for e in range(4):
        src, turn = r.source_BT[e].tolist(), r.turn_BT[e].tolist()
        p = int(r.prompt_len_B[e])
        assert src[:p] == [Source.PROMPT] * p and turn[:p] == [-1] * p
        spans = batch.action_spans[e]
        assert len(spans) == batch.turn_mask_EK[e].sum() == 3
        for k, (a, b) in enumerate(spans):
            assert set(src[a:b]) == {int(Source.POLICY)} and set(turn[a:b]) == {k}
            assert (r.logp_mu_BT[e, a:b] < 0).all() and (r.version_BT[e, a:b] == 0).all()
            assert (r.policy_id_BT[e, a:b] == 0).all()
            nxt = spans[k + 1][0] if k + 1 < len(spans) else None
            if nxt is not None:  # the reply sits between this action and the next, with this turn's index
                reply = src[b:nxt]
                assert reply and set(reply) == {int(Source.TOOL if k % 2 == 0 else Source.ENV)}
                assert set(turn[b:nxt]) == {k}
                assert r.tokens_BT[e, b].item() == 3 + (b - a)
        n = int(r.attention_mask_BT[e].sum())
        assert all(s == Source.PAD for s in src[n:]) and all(s != Source.PAD for s in src[:n])
        # logp / versions exist exactly on policy tokens
        pol = r.source_BT[e] == Source.POLICY
        assert torch.equal(r.version_BT[e] >= 0, pol)
        assert (r.logp_mu_BT[e][~pol] == 0).all()
    assert torch.equal(r.loss_mask_BT, r.source_BT == Source.POLICY)
    assert batch.outcomes == ["done"] * 4 and r.finished_B.all()
    # the reward of turn k is 1 iff that action ended with EOS
    for e in range(4):
        for k, (_, b) in enumerate(batch.action_spans[e]):
            assert batch.rewards_EK[e, k] == float(r.tokens_BT[e, b - 1].item() == EOS)
    assert batch.state_EK[:, 1].unique().numel() == 1  # info["state"] = 1 for every episode's second turn


def test_same_seeds_same_batch_and_other_seeds_differ():
    _, engine = _engine()
    a = _run(engine, [EchoEnv() for _ in range(4)], [0, 1, 2, 3])
    b = _run(engine, [EchoEnv() for _ in range(4)], [0, 1, 2, 3])
    c = _run(engine, [EchoEnv() for _ in range(4)], [0, 1, 2, 3], seed=7)
    assert torch.equal(a.rollout.tokens_BT, b.rollout.tokens_BT) and torch.equal(a.rewards_EK, b.rewards_EK)
    assert not torch.equal(a.rollout.tokens_BT, c.rollout.tokens_BT)


def test_outcomes_budget_turn_cap_and_env_error():
    _, engine = _engine()
    envs = [EchoEnv(turns=10), EchoEnv(turns=10), EchoEnv(turns=10, fail_at=1), EchoEnv(turns=10, reply_len=40)]
    envs[1].max_turns = 2  # the environment's own cap, below the run's
    batch = _run(engine, envs, [0, 1, 2, 3], max_turns=3, budget=40)
    assert batch.outcomes[0] == "max_turns" and batch.turn_mask_EK[0].sum() == 3
    assert batch.outcomes[1] == "max_turns" and batch.turn_mask_EK[1].sum() == 2
    assert batch.outcomes[2] == "env_error" and batch.failed == 1 and batch.turn_mask_EK[2].sum() == 2
    assert batch.rewards_EK[2, 1] == 0
    assert batch.outcomes[3] == "budget"  # its 40-token reply never fits: not appended
    assert int(batch.rollout.attention_mask_BT[3].sum()) <= 40
    assert not batch.rollout.finished_B.any()
    m = batch.metrics()
    assert m["agent/outcome_max_turns_frac"] == 0.5 and m["agent/outcome_env_error_frac"] == 0.25
    tight = _run(engine, [EchoEnv(turns=10)], [0], max_turns=10, budget=12, max_new=4)
    assert tight.outcomes == ["budget"]
    assert int(tight.rollout.attention_mask_BT[0].sum()) <= 12


def test_a_reset_that_fails_or_does_not_fit_names_the_environment():
    _, engine = _engine()

    class Broken(EchoEnv):
        def reset(self, seed):
            raise KeyError("no map")

    with pytest.raises(ValueError, match=r"Broken.reset\(seed=5\) failed"):
        _run(engine, [Broken()], [5])
    with pytest.raises(ValueError, match="max_episode_tokens 3"):
        _run(engine, [EchoEnv()], [3], budget=3)


@pytest.mark.parametrize("pad_id", [0, EOS])
def test_property_zero_gradient_off_policy_tokens(pad_id):
    """Random trajectories (random reply lengths, sources, turn counts): the loss's gradient w.r.t. every
    token's log-prob is zero off the policy tokens, nonzero on them; pad == eos changes nothing."""
    model, engine = _engine(pad_id=pad_id)
    rng = random.Random(pad_id)
    envs = [EchoEnv(turns=rng.randint(1, 4), reply_len=rng.randint(1, 5)) for _ in range(6)]
    batch = _run(engine, envs, list(range(6)), params=SamplingParams(max_new_tokens=5, top_k=20))
    r = batch.rollout
    logp_BT, _ = token_logprobs(model, r)
    leaf = logp_BT.detach().requires_grad_(True)
    adv_EK = torch.randn(batch.rewards_EK.shape)
    adv_BT = broadcast_turns(adv_EK, r)
    mask = r.loss_mask_BT
    for name in ("grpo", "ppo", "cispo"):
        loss, _ = get_preset(name)(LossInputs(logp_theta_BT=leaf, logp_old_BT=logp_BT.detach(), advantages_BT=adv_BT,
                                              mask_BT=mask, logp_mu_BT=r.logp_mu_BT))
        (g,) = torch.autograd.grad(loss, leaf)
        assert (g[~mask] == 0).all(), name
        assert (g[mask] != 0).all(), name
    assert torch.equal(mask, r.source_BT == Source.POLICY)
    # attention covers every non-pad token, even where the pad id is the EOS id
    assert torch.equal(r.attention_mask_BT, r.source_BT != Source.PAD)
    if pad_id == EOS:
        assert (r.tokens_BT[r.source_BT == Source.ENV] == EOS).any()  # EOS ids that are not policy tokens


def test_broadcast_turns_puts_each_turns_value_on_its_action_only():
    _, engine = _engine()
    batch = _run(engine, [EchoEnv(turns=3) for _ in range(2)], [0, 1])
    vals = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    out = broadcast_turns(vals, batch.rollout)
    for e in range(2):
        for k, (a, b) in enumerate(batch.action_spans[e]):
            assert (out[e, a:b] == vals[e, k]).all()
        assert (out[e][~batch.rollout.loss_mask_BT[e]] == 0).all()


class NoStateEnv(EchoEnv):
    """EchoEnv without ``info["state"]`` or ``state_id()``: anchors fall back to the observation's tokens."""

    def step(self, action: list[int]) -> StepResult:
        out = super().step(action)
        return StepResult(out.observation, out.reward, out.done, {})


class Walk(EchoEnv):
    """Position 0 or 1: an action of even length stays, odd length moves to the other one; ``state_id()`` and
    ``info["state"]`` give the position, so turn 0 (position 0, from ``state_id``) is revisited later."""

    def reset(self, seed: int) -> Observation:
        self.pos = 0
        return super().reset(seed)

    def state_id(self):
        return ("pos", self.pos)

    def step(self, action: list[int]) -> StepResult:
        out = super().step(action)
        self.pos = (self.pos + len(action)) % 2
        return StepResult(out.observation, out.reward, out.done, {"state": ("pos", self.pos)})


def _anchor_run(envs, seeds):
    _, engine = _engine()
    return _run(engine, envs, seeds, params=SamplingParams(max_new_tokens=4, top_k=20))


def test_first_turns_of_a_group_share_the_reset_observations_anchor():
    # groups are [0, 1], [2, 3], [4, 5]: one seed per group; seeds 1 and 5 give prompts of different lengths
    batch = _anchor_run([NoStateEnv() for _ in range(6)], [1, 1, 5, 5, 2, 2])
    s0 = batch.state_EK[:, 0].tolist()
    assert s0[0] == s0[1] and s0[2] == s0[3] and s0[4] == s0[5]
    assert len({s0[0], s0[2], s0[4]}) == 3  # different reset observations, different anchors
    with_state = _anchor_run([EchoEnv() for _ in range(2)], [3, 3])  # info["state"] later, tokens at reset
    assert with_state.state_EK[0, 0] == with_state.state_EK[1, 0]


def test_without_info_state_the_anchor_is_the_observation_tokens():
    batch = _anchor_run([NoStateEnv(turns=3) for _ in range(6)], [0, 0, 1, 1, 2, 2])
    r = batch.rollout
    seen: dict[tuple, int] = {}
    for e in range(6):
        spans = batch.action_spans[e]
        for k in range(1, len(spans)):  # turn k answers the reply between action k-1 and action k
            reply = tuple(r.tokens_BT[e, spans[k - 1][1]:spans[k][0]].tolist())
            sid = int(batch.state_EK[e, k])
            assert seen.setdefault(reply, sid) == sid  # equal replies, equal anchors
            assert sid != batch.state_EK[e, 0]  # a reply never matches a reset observation here
    assert len(set(seen.values())) == len(seen) >= 2  # different replies, different anchors


def test_state_id_anchors_the_reset_state_and_its_revisits():
    batch = _anchor_run([Walk(turns=4) for _ in range(6)], [0, 0, 1, 1, 2, 2])
    start = int(batch.state_EK[0, 0])
    assert (batch.state_EK[:, 0] == start).all()  # ("pos", 0) for every episode, from state_id()
    revisits = 0
    for e in range(6):
        pos = 0
        for k, (a, b) in enumerate(batch.action_spans[e]):
            assert (int(batch.state_EK[e, k]) == start) == (pos == 0)
            revisits += k > 0 and pos == 0
            pos = (pos + b - a) % 2
    assert revisits > 0  # some later turn is back at the start and shares turn 0's anchor


def test_text_env_state_id_is_forwarded_and_an_unhashable_state_is_refused():
    from tether.agent.envs import FrozenLake
    from tether.agent.render import PlainRenderer, TextEnvAdapter
    from tether.models.tokenizer import CharTokenizer

    env = TextEnvAdapter(FrozenLake(), PlainRenderer(CharTokenizer()))
    env.reset(0)
    start = env.state_id()
    step = env.env.step("U")  # off the top edge: stays at the start
    assert step.info["state"] == start and env.state_id() == start

    class Listy(EchoEnv):
        def state_id(self):
            return [self.k]

    with pytest.raises(ValueError, match=r"Listy \(reset\(seed=0\)\).*not hashable"):
        _anchor_run([Listy()], [0])
