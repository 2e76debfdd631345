"""The built-in text environments (tether.agent.envs): determinism, solvability by the scripted expert, the
token budget of an optimal episode, invalid actions, reward / done semantics, the calculator's safe parser,
and the registry's loading of a user's ``module:Factory`` with its error messages."""

from __future__ import annotations

import builtins
import random
import textwrap

import pytest

from tether.agent.env import TextEnv, TextStep
from tether.agent.envs import ENVS, EnvLoadError, make_env_factory
from tether.agent.envs.calculator import Calculator, calculate
from tether.agent.envs.countdown import Countdown
from tether.agent.envs.frozenlake import FrozenLake
from tether.agent.envs.guess import Guess
from tether.models.tokenizer import CharTokenizer
from tether.rollout import Source

SEEDS = range(150)
JUNK = ["", "   ", "xyz", "??", "A:", "C:", "LL", "A:1/", "C:__import__('os')", "1" * 40, "A: twelve", "\n\n"]


def play(env, seed: int, policy) -> tuple[str, list[tuple[str, TextStep]]]:
    """The prompt and the (action, step) pairs of one episode, ``policy(env, turn)`` choosing the actions,
    up to the environment's ``max_turns``."""
    prompt = env.reset(seed)
    steps = []
    for k in range(env.max_turns):
        action = policy(env, k)
        step = env.step(action)
        steps.append((action, step))
        if step.done:
            break
    return prompt, steps


def expert(env, k):
    return env.expert_action()


@pytest.mark.parametrize("name", sorted(ENVS))
def test_each_builtin_is_a_text_env(name):
    env = ENVS[name]()
    assert isinstance(env, TextEnv)
    assert isinstance(env.max_turns, int) and env.max_turns >= 1
    assert callable(env.expert_action)


@pytest.mark.parametrize("name", sorted(ENVS))
def test_same_seed_same_episode_and_seeds_vary(name):
    rng = random.Random(0)
    mixed = ["L", "R", "D", "U", "A:5", "C:3*4", "16", "8", "junk"]

    def noisy(env, k):  # a fixed mix of expert moves and arbitrary actions, the same on both runs
        return env.expert_action() if rng.random() < 0.5 else rng.choice(mixed)

    for seed in range(20):
        rng.seed(seed)
        first = play(ENVS[name](), seed, noisy)
        rng.seed(seed)
        second = play(ENVS[name](), seed, noisy)
        assert first == second
    episodes = {repr(play(ENVS[name](), seed, expert)) for seed in range(40)}
    assert len(episodes) >= 10, "the seed should choose the episode"


@pytest.mark.parametrize("name", sorted(ENVS))
def test_the_expert_wins_every_seed_within_max_turns_and_the_episode_fits_the_budget(name):
    tok = CharTokenizer()
    for seed in SEEDS:
        env = ENVS[name]()
        prompt, steps = play(env, seed, expert)
        last = steps[-1][1]
        assert last.done and last.reward == 1.0 and last.info["success"] is True, (seed, steps)
        assert all(not s.done and s.reward == 0 and s.info["success"] is False for _, s in steps[:-1])
        assert not any(s.info.get("invalid") for _, s in steps)
        # what the episode runner appends: prompt, then per turn the action, its EOS, and the reply
        tokens = len(tok.encode(prompt))
        tokens += sum(len(tok.encode(a)) + 1 for a, _ in steps)
        tokens += sum(len(tok.encode(s.observation)) for _, s in steps if not s.done)
        assert tokens < 200, (seed, tokens)


@pytest.mark.parametrize("name", sorted(ENVS))
def test_invalid_actions_get_a_short_error_reply_and_the_episode_goes_on(name):
    for seed, junk in enumerate(JUNK):
        env = ENVS[name]()
        env.reset(seed)
        step = env.step(junk)
        assert not step.done and step.reward == 0.0, (junk, step)
        assert step.observation.startswith("?") and len(step.observation) <= 8, (junk, step)
        assert step.info["invalid"] is True and env.turns == 1
        for _ in range(env.max_turns):  # the state is intact: the expert still wins from here
            after = env.step(env.expert_action())
            assert not after.info.get("invalid")
            if after.done:
                break
        assert after.done and after.info["success"] is True


@pytest.mark.parametrize("name", sorted(ENVS))
def test_step_outside_an_episode_raises(name):
    env = ENVS[name]()
    with pytest.raises(RuntimeError, match="before reset"):
        env.step("x")
    _, steps = play(env, 3, expert)
    assert steps[-1][1].done
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.step(env.expert_action() if name != "frozenlake" else "R")
    env.reset(4)  # a new episode is fine
    env.step("x")


# ------------------------------------------------------------------------------------------ frozenlake


def test_frozenlake_format_moves_holes_goal_and_edges():
    env = FrozenLake(layout="classic")
    assert env.reset(0) == "SFFF\nFHFH\nFFFH\nHFFG\n00\n"
    assert env.reset(123) == env.reset(0), "the classic map ignores the seed"
    step = env.step("U")  # off the edge: stays
    assert (step.observation, step.done, step.source) == ("00\n", False, Source.ENV)
    assert env.step(" r ").observation == "01\n"
    hole = env.step("D")  # (1, 1) is a hole
    assert hole.done and hole.reward == 0.0 and hole.info["success"] is False
    env.reset(0)
    path = [env.step(a) for a in "DDRRDR"]
    assert [s.observation for s in path[:-1]] == ["10\n", "20\n", "21\n", "22\n", "32\n"]
    assert path[-1].done and path[-1].reward == 1.0 and path[-1].info["success"] is True


def test_frozenlake_random_maps_are_solvable_within_max_turns_and_the_expert_is_shortest():
    from tether.agent.envs.frozenlake import distances_to_goal

    holes = []
    for seed in range(200):
        env = FrozenLake(max_turns=6)
        rows = env.reset(seed).split("\n")[:4]
        assert rows[0][0] == "S" and rows[3][3] == "G" and all(len(r) == 4 and set(r) <= set("SFHG") for r in rows)
        assert distances_to_goal(tuple(rows))[(0, 0)] <= 6
        holes.append(sum(r.count("H") for r in rows))
        _, steps = play(env, seed, expert)
        assert len(steps) == 6 and steps[-1][1].reward == 1.0  # 6 moves: the Manhattan distance, the least
    assert min(holes) == 0 and max(holes) >= 4, "maps should range from open to crowded"


def test_frozenlake_state_ids_the_position():
    env = FrozenLake(layout="classic")
    env.reset(0)
    a, b, c = env.step("R"), env.step("L"), env.step("x")
    assert a.info["state"] != b.info["state"] == c.info["state"]


def test_frozenlake_refuses_bad_options():
    with pytest.raises(ValueError, match="layout"):
        FrozenLake(layout="maze")
    with pytest.raises(ValueError, match="needs at least 6 moves"):
        FrozenLake(max_turns=5)
    with pytest.raises(ValueError, match="size must be 4"):
        FrozenLake(size=5, layout="classic", max_turns=10)


# ------------------------------------------------------------------------------------------ calculator


def test_calculator_tool_then_answer():
    env = Calculator()
    prompt = env.reset(7)
    problem = prompt.removesuffix("=?\n")
    a, b_op_c = problem.split("*")
    assert len(a) == 2 and prompt.endswith("=?\n")
    value = calculate(problem)
    tool = env.step(f"c : {problem} ")
    assert (tool.observation, tool.source, tool.done) == (f"={value}\n", Source.TOOL, False)
    assert env.step("C:2+3*4").observation == "=14\n"
    assert env.step("C:(2+3)*4").observation == "=20\n"
    right = env.step(f"A: {value}")
    assert right.done and right.reward == 1.0 and right.info["success"] is True
    env.reset(7)
    wrong = env.step(f"A:{value + 1}")
    assert wrong.done and wrong.reward == 0.0 and wrong.info["success"] is False


def test_calculator_problems_need_the_tool():
    values = [calculate(Calculator().reset(s).removesuffix("=?\n")) for s in range(100)]
    assert min(values) > 10 and max(values) > 5000 and len(set(values)) > 90


@pytest.mark.parametrize("text,code", [
    ("__import__('os').getcwd()", "parse"),
    ("__import__('os').system('echo pwned')", "long"),
    ("open('/etc/passwd').read()", "parse"),
    ("x+1", "parse"),
    ("2**1000000", "parse"),
    ("9**9**9**9", "parse"),
    ("1e9999", "parse"),
    ("-5", "parse"),
    ("(1+2", "parse"),
    ("1/0", "op"),
    ("12/4", "op"),
    ("1+" * 20 + "1", "long"),
    ("999999999*999999999", "big"),
    ("", "parse"),
])
def test_calculator_refuses_what_is_not_its_grammar_and_never_evals(monkeypatch, text, code):
    def refuse(*args, **kwargs):
        raise AssertionError("eval/exec must never be called")

    monkeypatch.setattr(builtins, "eval", refuse)
    monkeypatch.setattr(builtins, "exec", refuse)
    assert calculate(text) == code
    env = Calculator()
    env.reset(0)
    step = env.step(f"C:{text}")
    assert step.observation == f"?{code}\n" and step.source is Source.TOOL and not step.done


def test_calculator_values():
    assert calculate(" 37 * 24 + 5 ") == 893
    assert calculate("((7))") == 7
    assert calculate("3-10") == -7
    assert calculate("999999*999999", max_abs=10**12) == 999998000001
    assert calculate("1" * 10) == "parse"  # countdown's literal bound (9 digits)


# ------------------------------------------------------------------------------------------- countdown


def test_countdown_tool_and_answer():
    env = Countdown()
    prompt = env.reset(5)
    assert prompt == f"make {env.target} from {','.join(map(str, env.numbers))}:\n"
    a, b = env.numbers[:2]
    plus = env.step(f"C:{a}+{b}")
    assert (plus.observation, plus.source) == (f"={a + b}\n", Source.TOOL)
    assert env.step(f"C:{a}+{a}").observation == ("?nums\n" if env.numbers.count(a) < 2 else f"={2 * a}\n")
    assert env.step("C:1000").observation == "?nums\n"
    assert env.step("C:(").observation == "?parse\n"
    assert env.step("A:(").observation == "?parse\n"


def test_countdown_fractions_division_by_zero_and_wrong_answers():
    env = Countdown(n_numbers=3)
    for seed in range(200):  # a problem with two numbers that do not divide each other, and one with a 0 option
        env.reset(seed)
        a, b = env.numbers[:2]
        if a % b:
            break
    assert env.step(f"C:{a}/{b}").observation == f"={__import__('fractions').Fraction(a, b)}\n"
    assert env.step(f"C:{a}/({b}-{b})").observation in ("?div0\n", "?nums\n")
    wrong = env.step(f"A:{env.numbers[0]}")
    assert wrong.done and (wrong.reward == 1.0) == (env.numbers[0] == env.target)
    env.reset(seed)
    assert env.step(f"A:{env.target}").reward == (1.0 if env.target in env.numbers else 0.0)


def test_countdown_ops_option_and_expert_without_tool():
    env = Countdown(ops="+-", expert_uses_tool=False)
    env.reset(1)
    a, b = env.numbers[:2]
    assert env.step(f"C:{a}*{b}").observation == "?op\n"
    assert env.expert_action().startswith("A:")
    assert set(env.expert_action()[2:]) <= set("0123456789+-()")
    _, steps = play(Countdown(expert_uses_tool=False), 9, expert)
    assert len(steps) == 1 and steps[0][1].reward == 1.0


def test_countdown_expert_submits_what_the_tool_confirmed():
    env = Countdown()
    env.reset(2)
    sol = env.solution
    spaced = " ".join(sol)
    env.step(f"C:{spaced}")
    assert env.expert_action() == f"A:{spaced}"


# ----------------------------------------------------------------------------------------------- guess


def test_guess_feedback_and_range():
    env = Guess(n=32)
    assert env.reset(0) == "guess 1-32\n"
    s = env.secret
    lower = env.step(str(s + 1)) if s < 32 else None
    if lower is not None:
        assert lower.observation == "<\n"
    higher = env.step(str(s - 1)) if s > 1 else None
    if higher is not None:
        assert higher.observation == ">\n"
    assert env.step("0").observation == "?\n" and env.step("33").observation == "?\n"
    win = env.step(f" {s} ")
    assert win.done and win.reward == 1.0 and win.info["success"] is True
    env = Guess(n=32, show_range=True)
    env.reset(0)
    env.secret = 10
    assert env.step("16").observation == "<1-15\n"
    assert env.step("4").observation == ">5-15\n"
    assert env.step("20").observation == "<5-15\n", "a guess outside the range leaves it as it was"
    assert env.expert_action() == "10"


def test_guess_every_secret_is_found_within_max_turns():
    for n in (2, 16, 31, 32):
        turns = Guess(n=n).max_turns if n == 32 else n.bit_length()
        for secret in range(1, n + 1):
            env = Guess(n=n, max_turns=turns)
            env.reset(0)
            env.secret = secret
            for _ in range(turns):
                if env.step(env.expert_action()).done:
                    break
            else:
                pytest.fail(f"n={n} secret={secret} not found in {turns} guesses")
    with pytest.raises(ValueError, match="may need 6 guesses"):
        Guess(n=32, max_turns=5)


# ------------------------------------------------------------------------------------------- registry


def test_builtin_names_and_did_you_mean():
    assert set(ENVS) == {"frozenlake", "calculator", "countdown", "guess"}
    assert make_env_factory(" frozenlake ") is FrozenLake
    with pytest.raises(EnvLoadError, match="'frozenlak' is not a built-in \\(did you mean 'frozenlake'\\?\\)"):
        make_env_factory("frozenlak")
    with pytest.raises(EnvLoadError, match="built-ins: calculator, countdown, frozenlake, guess"):
        make_env_factory("chess")
    with pytest.raises(EnvLoadError, match="non-empty"):
        make_env_factory("")


USER_ENV = """
    from tether.agent.env import TextStep

    class Echo:
        max_turns = 2

        def __init__(self, word="hi"):
            self.word = word

        def reset(self, seed):
            return self.word + "\\n"

        def step(self, action):
            ok = action == self.word
            return TextStep(None, float(ok), True, {"success": ok})

    def make_junk():
        return 42

    def broken():
        raise KeyError("inside the factory")

    CONST = 3
"""


def test_a_users_env_from_a_file_and_a_module(tmp_path, monkeypatch):
    path = tmp_path / "my_envs.py"
    path.write_text(textwrap.dedent(USER_ENV))
    factory = make_env_factory(f"{path}:Echo")
    env = factory(word="yo")
    assert env.reset(0) == "yo\n" and env.step("yo").reward == 1.0
    monkeypatch.syspath_prepend(str(tmp_path))
    assert make_env_factory("my_envs:Echo")().reset(1) == "hi\n"
    with pytest.raises(EnvLoadError, match="returned int, which has no reset"):
        make_env_factory(f"{path}:make_junk")()
    with pytest.raises(KeyError, match="inside the factory"):  # the user's own error, unchanged
        make_env_factory(f"{path}:broken")()
    with pytest.raises(EnvLoadError, match="'CONST' is a int, not a class or function"):
        make_env_factory(f"{path}:CONST")
    with pytest.raises(EnvLoadError, match=f"environment '{path}:Nope': .* has no attribute 'Nope'.*Echo"):
        make_env_factory(f"{path}:Nope")
    with pytest.raises(EnvLoadError, match="environment 'no_such_module_xyz:Env': module 'no_such_module_xyz' not found"):
        make_env_factory("no_such_module_xyz:Env")
    with pytest.raises(EnvLoadError, match="file '.*missing.py' not found"):
        make_env_factory(f"{tmp_path}/missing.py:Env")
    bad = tmp_path / "bad_env.py"
    bad.write_text("raise RuntimeError('boom at import')\n")
    with pytest.raises(EnvLoadError, match="environment '.*bad_env.py:Env': importing .* RuntimeError: boom at import"):
        make_env_factory(f"{bad}:Env")


@pytest.mark.parametrize("name", sorted(ENVS))
def test_builtins_run_as_a_task_with_the_warm_start(name):
    """The episode runner's path: the task made from the name, expert episodes rendered token-natively."""
    from tether.agent.render import PlainRenderer
    from tether.agent.task import build_env_task

    tok = CharTokenizer()
    task = build_env_task(name, {})
    tokens, mask = task.warmstart_batch(random.Random(0), 8, tok, PlainRenderer(tok), max_turns=8, max_tokens=256,
                                        pad_id=tok.pad_id)
    assert tokens.shape[1] < 200 and mask.any(dim=1).all()
    text = tok.decode(tokens[0].tolist(), skip_special=False)
    assert "<eos>" in text
    with pytest.raises(ValueError, match="do not fit its constructor"):
        build_env_task(name, {"no_such_option": 1})
