"""Reward functions: built-ins, loading by import path, and the failure rule of the guarded runner."""

import logging
import math
import threading
import time

import pytest

from tether.tasks.rewards import (
    RewardLoadError,
    ScoreResult,
    TooManyHungRewards,
    abandoned_alive,
    exact_match,
    failure_counts,
    load_reward_fn,
    make_numeric,
    numeric,
    numeric_first,
    parse_number,
    score,
    score_batch,
)

pytestmark = pytest.mark.unit


# ------------------------------------------------------------------------------------- built-ins


def test_exact_match():
    assert exact_match("p", "Paris", "Paris") == 1.0
    assert exact_match("p", "  Paris \n because ...", " Paris") == 1.0
    assert exact_match("p", "paris", "Paris") == 0.0
    assert exact_match("p", "\nParis", "Paris") == 0.0  # first line is empty
    assert exact_match("p", "", "Paris") == 0.0


@pytest.mark.parametrize(
    "text, first, last",
    [
        ("the answer is 42", 42.0, 42.0),
        ("3 apples and -2.5 pears, total 0.5", 3.0, 0.5),
        ("x=1e3 or .25", 1000.0, 0.25),
        ("no numbers here", None, None),
        ("+7", 7.0, 7.0),
    ],
)
def test_parse_number(text, first, last):
    assert parse_number(text, "first") == first
    assert parse_number(text, "last") == last


def test_numeric_rewards_and_tolerance():
    assert numeric("p", "so it is 19", "19") == 1.0
    assert numeric("p", "19, no wait, 20", "19") == 0.0
    assert numeric_first("p", "19, no wait, 20", "19") == 1.0
    assert numeric("p", "0.1+0.2 = 0.30000000000000004", "0.3") == 1.0
    assert numeric("p", "19.001", "19") == 0.0
    assert numeric("p", "no number", "19") == 0.0
    assert numeric("p", "1e999", "19") == 0.0  # inf is not a match
    loose = make_numeric("last", rel_tol=0.0, abs_tol=0.01)
    assert loose("p", "19.005", "19") == 1.0 and loose("p", "19.02", "19") == 0.0
    with pytest.raises(ValueError, match="contains no number"):
        numeric("p", "19", "nineteen")
    with pytest.raises(ValueError, match="position"):
        make_numeric("middle")


# --------------------------------------------------------------------------------------- loading


def test_load_builtin_and_import_paths(tmp_path, monkeypatch):
    assert load_reward_fn("exact_match") is exact_match
    assert load_reward_fn("numeric") is numeric
    assert load_reward_fn("countdown")("", "2*5", "10|2,5") == 1.0
    mod = tmp_path / "my_rewards_mod.py"
    mod.write_text(
        "def length_reward(prompt, completion, answer):\n    return float(len(completion))\n"
        "class Scorer:\n    @staticmethod\n    def score(prompt, completion, answer, *, scale=2.0):\n"
        "        return scale\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = load_reward_fn("my_rewards_mod:length_reward")
    assert fn("p", "abcd", "a") == 4.0
    assert load_reward_fn("my_rewards_mod:Scorer.score")("p", "c", "a") == 2.0
    by_file = load_reward_fn(f"{mod}:length_reward")
    assert by_file("p", "abc", "a") == 3.0
    assert load_reward_fn("math:hypot")  # C function, no signature: accepted


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nocolon", "is neither a built-in"),
        ("a:b:c", "is neither a built-in"),
        (":fn", "both parts non-empty"),
        ("mod:", "both parts non-empty"),
        ("not a module:fn", "is not a valid module name"),
        ("os:path-join", "is not a valid attribute name"),
        ("tether_no_such_module_xyz:fn", "module 'tether_no_such_module_xyz' not found"),
        ("tether.tasks.rewards:no_such_fn", "'tether.tasks.rewards' has no attribute 'no_such_fn'"),
        ("tether.tasks.rewards:log.nope", "'log' has no attribute 'nope'"),
        ("tether.tasks.rewards:RewardFn.x", "has no attribute 'x'"),
        ("tether.tasks.countdown:MAX_DEPTH", "'MAX_DEPTH' is a int, not callable"),
        ("tether.tasks.rewards:parse_number", "cannot be called as fn(prompt, completion, answer)"),
        ("", "non-empty string"),
        ("missing_file.py:fn", "file 'missing_file.py' not found"),
    ],
)
def test_load_reward_fn_errors(spec, message):
    with pytest.raises(RewardLoadError) as info:
        load_reward_fn(spec)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_load_reward_fn_distinguishes_missing_dependency_and_import_failure(tmp_path, monkeypatch):
    (tmp_path / "needs_dep_mod.py").write_text("import tether_missing_dependency_abc\ndef r(p, c, a):\n    return 1.0\n")
    (tmp_path / "broken_mod.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RewardLoadError, match="imports the missing module 'tether_missing_dependency_abc'"):
        load_reward_fn("needs_dep_mod:r")
    with pytest.raises(RewardLoadError, match="RuntimeError: boom at import"):
        load_reward_fn("broken_mod:r")
    with pytest.raises(RewardLoadError, match="RuntimeError: boom at import"):
        load_reward_fn(f"{tmp_path / 'broken_mod.py'}:r")


# ---------------------------------------------------------------------------------------- runner


def raises(prompt, completion, answer):
    return 1 / 0


@pytest.mark.parametrize("timeout_s", [None, 1.0])
def test_score_ok_and_failure_kinds(timeout_s):
    assert score(exact_match, "p", "x", "x", timeout_s) == ScoreResult(1.0)
    assert score(lambda p, c, a: True, "p", "x", "x", timeout_s) == ScoreResult(1.0)
    assert score(lambda p, c, a: 3, "p", "x", "x", timeout_s) == ScoreResult(3.0)
    r = score(raises, "p", "x", "x", timeout_s)
    assert (r.reward, r.failed, r.kind) == (0.0, True, "exception")
    assert r.reason == "exception: ZeroDivisionError: division by zero"
    for bad in (math.nan, math.inf, -math.inf):
        r = score(lambda p, c, a, v=bad: v, "p", "x", "x", timeout_s)
        assert (r.reward, r.failed, r.reason) == (0.0, True, f"non-finite: returned {bad}")
    for bad, reason in ((10**400, "non-finite: returned int too large for a float"),
                        (1e39, "out of range: returned 1e+39, beyond +-1e+12 (it would overflow the float32 advantages)"),
                        (-2e12, "out of range: returned -2e+12, beyond +-1e+12 (it would overflow the float32 advantages)")):
        r = score(lambda p, c, a, v=bad: v, "p", "x", "x", timeout_s)
        assert (r.reward, r.failed, r.reason, r.kind) == (0.0, True, reason, reason.split(":")[0])
    assert score(lambda p, c, a: -1e12, "p", "x", "x", timeout_s) == ScoreResult(-1e12)  # the bound itself is fine
    for bad, name in ((None, "NoneType"), ("1.0", "str"), ([1.0], "list")):
        r = score(lambda p, c, a, v=bad: v, "p", "x", "x", timeout_s)
        assert (r.reward, r.failed, r.reason) == (0.0, True, f"bad return type: {name}")


def wait_until_no_abandoned_threads():
    deadline = time.time() + 5
    while abandoned_alive() and time.time() < deadline:
        time.sleep(0.005)
    assert abandoned_alive() == 0


def test_score_timeout_marks_failed_and_returns_promptly():
    release = threading.Event()
    started = threading.Event()

    def hangs(prompt, completion, answer):
        started.set()
        release.wait(10)
        return 1.0

    try:
        t0 = time.perf_counter()
        r = score(hangs, "p", "c", "a", timeout_s=0.05)
        elapsed = time.perf_counter() - t0
        assert started.is_set()
        assert (r.reward, r.failed, r.kind) == (0.0, True, "timeout")
        assert 0.04 < elapsed < 1.0
        # a fast call right after still works
        assert score(exact_match, "p", "a", "a", timeout_s=0.5) == ScoreResult(1.0)
    finally:
        release.set()
    wait_until_no_abandoned_threads()  # the abandoned call finishes once released


def test_too_many_hung_rewards_raises_instead_of_piling_up_threads():
    release = threading.Event()

    def hangs(prompt, completion, answer):
        release.wait(10)
        return 1.0

    wait_until_no_abandoned_threads()
    try:
        for _ in range(2):
            assert score(hangs, "p", "c", "a", timeout_s=0.01).kind == "timeout"
        assert abandoned_alive() == 2
        with pytest.raises(TooManyHungRewards, match="appears to hang"):
            score(hangs, "p", "c", "a", timeout_s=0.01, max_abandoned=2)
        # below the limit it still scores
        assert score(exact_match, "p", "a", "a", timeout_s=0.5, max_abandoned=3) == ScoreResult(1.0)
    finally:
        release.set()
    wait_until_no_abandoned_threads()


def test_score_logs_failures_and_batch_counts(caplog):
    def flaky(prompt, completion, answer):
        if completion == "boom":
            raise KeyError("k")
        if completion == "nan":
            return float("nan")
        return 1.0 if completion == answer else 0.0

    with caplog.at_level(logging.WARNING, logger="tether.tasks.rewards"):
        results = score_batch(flaky, ["p"] * 4, ["a", "boom", "nan", "b"], ["a"] * 4, timeout_s=1.0)
    assert [r.reward for r in results] == [1.0, 0.0, 0.0, 0.0]
    assert [r.failed for r in results] == [False, True, True, False]
    assert failure_counts(results) == {"exception": 1, "non-finite": 1}
    assert sum("flaky' failed (" in rec.message for rec in caplog.records) == 2  # names the reward
    with pytest.raises(ValueError, match="2 prompts, 1 completions"):
        score_batch(flaky, ["p", "q"], ["a"], ["a", "b"])
    with pytest.raises(ValueError, match="timeout_s"):
        score(flaky, "p", "a", "a", timeout_s=0)


def test_long_exception_messages_are_truncated_in_the_reason():
    def verbose(prompt, completion, answer):
        raise ValueError("x" * 10_000)

    r = score(verbose, "p", "c", "a")
    assert r.failed and r.reason.startswith("exception: ValueError: xxx") and len(r.reason) == 300
