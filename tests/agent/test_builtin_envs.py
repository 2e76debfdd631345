"""The built-in environments: deterministic, solvable by their scripted solver, within the tiny model's budget."""

import pytest

from tether.agent.envs import ENVS, make_env_factory
from tether.models.tokenizer import CharTokenizer

pytestmark = pytest.mark.unit


def _play(env, seed):
    text = env.reset(seed)
    chars, out = len(text), None
    for _ in range(env.max_turns):
        action = env.expert_action()
        out = env.step(action)
        chars += len(action) + 1 + len(out.observation or "")
        if out.done:
            break
    return out, chars, text


@pytest.mark.parametrize("name", ["frozenlake", "calculator", "countdown", "guess"])
def test_solver_succeeds_deterministically_within_budget(name):
    tok = CharTokenizer()
    for seed in range(60):
        a, chars, text = _play(make_env_factory(name)(), seed)
        b, _, text_b = _play(make_env_factory(name)(), seed)
        assert a.done and a.info.get("success") and a.reward > 0, (name, seed)
        assert text == text_b and a.reward == b.reward
        assert chars < 200 and tok.check(text) is None


def test_unknown_env_is_refused_by_name():
    assert set(ENVS) >= {"frozenlake", "calculator", "countdown", "guess"}
    with pytest.raises(ValueError, match="frozenlak"):
        make_env_factory("frozenlak")
