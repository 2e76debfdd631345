"""The optional adapters: gymnasium toy_text (``gym:ID``, the agents extra) and textarena (``textarena:ID``).

Tests of a family skip, saying what to install, when its package is missing; the refusals that need no package
(a missing package, a game refused by name) always run."""

from __future__ import annotations

import importlib.util
import json
import random
import re
import socket

import pytest

from tether.agent.envs import EnvLoadError, make_env_factory
from tether.train.config import TrainConfig

HAS_GYM = importlib.util.find_spec("gymnasium") is not None
HAS_TA = importlib.util.find_spec("textarena") is not None
needs_gym = pytest.mark.skipif(not HAS_GYM, reason="gymnasium is not installed: pip install -e '.[agents]'")
needs_ta = pytest.mark.skipif(not HAS_TA, reason="textarena is not installed: pip install -e '.[textarena]'")


def _play(env, actions):
    return [env.step(a) for a in actions]


# -- without the packages -------------------------------------------------------------------------------------

def test_a_missing_package_is_named_with_its_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("gymnasium", "textarena") else real(name, *a))
    with pytest.raises(EnvLoadError, match=r"gymnasium: pip install -e '\.\[agents\]'"):
        make_env_factory("gym:FrozenLake-v1")
    with pytest.raises(EnvLoadError, match=r"textarena: pip install -e '\.\[textarena\]'"):
        make_env_factory("textarena:GuessTheNumber-v0")


def test_textarena_games_that_need_the_network_or_other_players_are_refused_by_name():
    with pytest.raises(EnvLoadError, match="Wordle downloads nltk word lists"):
        make_env_factory("textarena:Wordle-v0")
    with pytest.raises(EnvLoadError, match="TwentyQuestions needs an OpenRouter API key"):
        make_env_factory("textarena:TwentyQuestions-v0")
    with pytest.raises(EnvLoadError, match="'textarena:Chess-v0' is not an offline single-player game.*GuessTheNumber"):
        make_env_factory("textarena:Chess-v0")


# -- gymnasium ------------------------------------------------------------------------------------------------

@needs_gym
def test_gym_renders_each_family_as_documented():
    from tether.agent.envs.gym_text import GymText

    lake = GymText("FrozenLake-v1", is_slippery=False)
    assert lake.reset(0) == "SFFF\nFHFH\nFFFH\nHFFG\n0,0\n"
    assert lake.step("d").observation == "1,0\n" and lake.state_id() == 4
    cliff = GymText("CliffWalking-v1")
    assert cliff.reset(0) == "............\n" * 3 + "SCCCCCCCCCCG\n3,0\n"
    assert cliff.step("R").reward == -100 and cliff.state_id() == 36  # into the cliff: back to the start
    taxi = GymText("Taxi-v4")
    text = taxi.reset(1)
    lines = text.splitlines()
    assert lines[0] == "+---------+" and len(lines) == 8 and all(len(x) == 11 for x in lines[:7])
    m = re.fullmatch(r"(\d),(\d) ([RGYBT]) ([RGYB])", lines[7])
    r, c, p, d = taxi.env.unwrapped.decode(taxi.state_id())
    assert m and (int(m[1]), int(m[2]), m[3], m[4]) == (r, c, "RGYBT"[p], "RGYB"[d])
    jack = GymText("Blackjack-v1")
    text = jack.reset(2)
    total, dealer, ace = jack.state_id()
    assert text == f"you {total} dealer {dealer}{' ace' if ace else ''}\n"


@needs_gym
def test_gym_actions_letters_digits_and_unreadable():
    from tether.agent.envs.gym_text import GymText

    env = GymText("FrozenLake-v1", is_slippery=False)
    assert [env.parse(a) for a in ("L", " d ", "r\n", "U", "0", "3", "4", "LL", "", "x")] == \
        [0, 1, 2, 3, 0, 3, None, None, None, None]
    env.reset(0)
    bad = env.step("north")
    assert (bad.observation, bad.reward, bad.done, bad.info["invalid"], env.state_id()) == ("?0,0\n", 0.0, False,
                                                                                           True, 0)
    out = _play(env, ["2", "R", "D", "D", "D", "R"])  # right, right, down x3, right: the goal
    assert out[-1].done and out[-1].reward == 1.0 and out[-1].info["success"]
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.step("L")
    taxi = GymText("Taxi-v4")
    taxi.reset(0)
    assert taxi.step("p").reward == -10  # an illegal pickup: gymnasium's own penalty


@needs_gym
def test_gym_is_deterministic_under_a_seed_slippery_included():
    from tether.agent.envs.gym_text import GymText

    moves = list("RRDDLURDRD")

    def run(seed):
        env = GymText("FrozenLake-v1")  # slippery: gymnasium's default
        first = env.reset(seed)
        steps = []
        for a in moves:
            s = env.step(a)
            steps.append((s.observation, s.reward, s.done))
            if s.done:
                break
        return first, steps

    assert run(5) == run(5)
    assert len({str(run(s)) for s in range(8)}) > 1  # the slips depend on the seed
    hands = {GymText("Blackjack-v1").reset(s) for s in range(10)}
    assert len(hands) > 1 and hands == {GymText("Blackjack-v1").reset(s) for s in range(10)}


@needs_gym
@pytest.mark.parametrize("env_id,kwargs", [("FrozenLake-v1", {"is_slippery": False}), ("CliffWalking-v1", {}),
                                           ("Taxi-v4", {})])
def test_gym_expert_wins_within_the_turn_cap(env_id, kwargs):
    from tether.agent.envs.gym_text import GymText

    for seed in range(5):
        env = GymText(env_id, **kwargs)
        env.reset(seed)
        for _ in range(env.max_turns):
            s = env.step(env.expert_action())
            if s.done:
                break
        assert s.done and s.info["success"], (env_id, seed)


def test_greedy_policy_against_a_hand_solved_chain():
    from tether.agent.envs.gym_text import greedy_policy

    # states 0-1-2-3, 3 terminal with reward 1 on entry; action 0 left, 1 right; from 0, left stays
    P = {s: {0: [(1.0, max(s - 1, 0), 0.0, False)], 1: [(1.0, s + 1, float(s + 1 == 3), s + 1 == 3)]}
         for s in range(3)}
    P[3] = {0: [(1.0, 3, 0.0, True)], 1: [(1.0, 3, 0.0, True)]}
    assert greedy_policy(P)[:3] == [1, 1, 1]
    # a trap: right from 1 pays 5 and ends, which beats the 1 at the far end
    P[1][1] = [(1.0, 3, 5.0, True)]
    assert greedy_policy(P)[:2] == [1, 1]
    P[0][0] = [(1.0, 0, 10.0, True)]  # a prize of 10 left of 0: worth 0.99 * 10 > 5 from state 1 too
    assert greedy_policy(P)[:2] == [0, 0]
    P[0][0] = [(1.0, 0, 4.0, True)]  # 4 < 0.99 * 5 from state 0; 0.99 * 4 < 5 from state 1
    assert greedy_policy(P)[:2] == [1, 1]


@needs_gym
def test_gym_spec_errors_name_the_id():
    with pytest.raises(EnvLoadError, match="'gym:Taxi-v3'.*Taxi-v4"):
        make_env_factory("gym:Taxi-v3")
    with pytest.raises(EnvLoadError, match="'gym:CartPole-v1' is not a toy_text environment"):
        make_env_factory("gym:CartPole-v1")
    with pytest.raises(ValueError, match="env_options"):
        make_env_factory("gym:FrozenLake-v1")(colour="red")


# -- textarena ------------------------------------------------------------------------------------------------

@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise OSError("test: no network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@needs_ta
def test_every_listed_textarena_game_resets_and_steps_offline(no_network):
    from tether.agent.envs.textarena_games import OFFLINE_GAMES, TextArenaGame

    for game in OFFLINE_GAMES:
        env = TextArenaGame(f"{game}-v0")
        first = env.reset(0)
        assert first.strip(), game
        env.step("[1]")  # whatever the game makes of it, it answers without the network


@needs_ta
def test_textarena_text_prompt_override_and_reward(no_network):
    from tether.agent.envs.textarena_games import TextArenaGame

    env = TextArenaGame("GuessTheNumber-v0", prompt="guess 1-8 as [n]", max_number=8)
    assert env.reset(4) == "guess 1-8 as [n]\n"
    secret = env.game.game_number
    wrong = 1 if secret != 1 else 2
    hint = env.step(f"[{wrong}]")
    assert hint.observation == f"The target number is {'higher' if secret > wrong else 'lower'}.\n"
    assert not hint.done and hint.reward == 0.0 and f"[{wrong}]" not in hint.observation  # no echo of the action
    win = env.step(f"[{secret}]")
    assert win.done and win.reward == 1.0 and win.info["success"] and win.observation is None
    full = TextArenaGame("GuessTheNumber-v0").reset(4)
    assert full.startswith("You are Player 0. You are playing Guess The Number.")


@needs_ta
def test_textarena_episodes_are_deterministic_and_leave_global_random_alone(no_network):
    from tether.agent.envs.textarena_games import TextArenaGame

    def secret(env, seed):
        env.reset(seed)
        return env.game.game_number

    random.seed(123)
    before = random.getstate()
    a, b = TextArenaGame("GuessTheNumber-v0"), TextArenaGame("GuessTheNumber-v0")
    assert secret(a, 7) == secret(b, 7)
    assert len({secret(TextArenaGame("GuessTheNumber-v0"), s) for s in range(12)}) > 1
    assert random.getstate() == before
    # two interleaved Minesweeper episodes (mines drawn from the global generator at the first reveal)
    x, y = TextArenaGame("Minesweeper-v0-small"), TextArenaGame("Minesweeper-v0-small")
    x.reset(3)
    y.reset(3)
    random.random()
    ox = x.step("[2 2]").observation
    oy = y.step("[2 2]").observation
    assert ox == oy and x.game.grid == y.game.grid  # without the swap the second draw differs


# -- a short train run per family -----------------------------------------------------------------------------

def _train(tmp_path, **kw):
    from tether.train.sync import train

    cfg = TrainConfig.from_flat(**{"steps": 2, "prompts_per_step": 2, "group_size": 4, "eval_size": 2,
                                   "progress": False, "threads": 1, "out": str(tmp_path / "run"), **kw})
    summary = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return summary, rows


@needs_gym
@pytest.mark.e2e
def test_train_two_steps_on_gym_frozenlake(tmp_path):
    summary, rows = _train(tmp_path, env="gym:FrozenLake-v1", env_options={"is_slippery": False, "max_turns": 8},
                           max_new_tokens=2, warmstart_steps=1, credit="gigpo", drift_every=0)
    assert summary["task"] == "env gym:FrozenLake-v1" and len(rows) == 2
    for r in rows:
        assert 1 <= r["agent/turns_mean"] <= 8 and r["agent/tokens_env_frac"] > 0
        assert r["mismatch/abs_logp_diff_max"] < 1e-4


@needs_ta
@pytest.mark.e2e
def test_train_two_steps_on_textarena_guess_the_number(tmp_path, no_network):
    summary, rows = _train(tmp_path, env="textarena:GuessTheNumber-v0", max_turns=3, max_new_tokens=4,
                           warmstart_steps=0, env_options={"prompt": "guess 1-8 as [n]", "max_number": 8})
    assert summary["task"] == "env textarena:GuessTheNumber-v0" and len(rows) == 2
    for r in rows:
        assert 1 <= r["agent/turns_mean"] <= 3 and r["agent/tokens_env_frac"] > 0
        assert r["agent/env_failed"] == 0
