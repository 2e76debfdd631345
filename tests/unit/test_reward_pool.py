"""Reward worker processes: hard timeouts that kill, crashes that cost one sample, no survivors.

Timeouts here are short (0.5-1 s) and the asserts are on counts and reasons, never on durations,
except upper bounds generous enough for a machine ten times slower (a killed call must not take
the hour it would take unkilled).
"""

import os
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tests.processes import run as run_child
from tests.processes import tether_env
from tether.tasks.reward_pool import RewardCall, RewardPool, RewardPoolError, default_workers

pytestmark = pytest.mark.unit
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) reward worker or process we started."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pids, seconds: float = 30.0) -> list[int]:
    """The pids still alive after waiting up to ``seconds`` for them to go."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


@pytest.fixture
def pools():
    """Pools made by a test; every worker is killed at the end, whatever happened, and checked gone."""
    made: list[RewardPool] = []

    def make(spec: str, **kw) -> RewardPool:
        made.append(RewardPool(f"_hostile_rewards:{spec}", **kw))
        return made[-1]

    yield make
    pids = [pid for p in made for pid in p.pids]
    for p in made:
        p.close()
    assert wait_gone(pids, 10) == []


def calls(*completions: str, answer: str = "a") -> list[RewardCall]:
    return [RewardCall("p", c, answer) for c in completions]


def test_gil_holding_regex_is_killed_and_counted_failed(pools):
    """C code holding the GIL (hours of regex backtracking) cannot outlast a 1 s timeout."""
    pool = pools("regex_always", workers=1, timeout_s=1.0)
    first = pool.pids[0]
    t0 = time.monotonic()
    (r,) = pool.map(calls("c"))
    assert time.monotonic() - t0 < 60
    assert (r.failed, r.kind, r.reward) == (True, "timeout", 0.0)
    assert "killed" in r.reason
    assert wait_gone([first], 10) == []
    assert pool.pids[0] != first  # replaced
    assert dict(pool.stats) == {"calls": 1, "failed": 1, "timeouts": 1, "crashes": 0, "restarts": 1}


def test_a_hang_costs_one_sample_and_the_others_are_scored(pools):
    pool = pools("sleep_on_4", workers=2, timeout_s=0.5)
    t0 = time.monotonic()
    results = pool.map(calls(*[str(i) for i in range(10)] + ["14"]))
    assert time.monotonic() - t0 < 60
    assert [r.failed for r in results] == [i in (4, 10) for i in range(11)]
    assert [r.reward for r in results] == [0.0 if i in (4, 10) else float(i) for i in range(11)]
    assert {r.kind for r in results if r.failed} == {"timeout"}
    assert (pool.stats["timeouts"], pool.stats["restarts"]) == (2, 2)
    assert [r.reward for r in pool.map(calls("1", "2"))] == [1.0, 2.0]  # the replacements work


def test_a_crashing_worker_costs_one_sample(pools):
    pool = pools("exit_on_x", workers=2, timeout_s=30.0)
    results = pool.map(calls("a", "x", "b", "x", "c"))
    assert [r.failed for r in results] == [False, True, False, True, False]
    assert results[1].reason == "crash: the worker process died during the call (exit code 7)"
    assert [r.reward for r in results] == [0.5, 0.0, 0.5, 0.0, 0.5]
    assert (pool.stats["crashes"], pool.stats["restarts"], pool.stats["timeouts"]) == (2, 2, 0)


def test_a_worker_killed_while_idle_costs_one_sample_at_most(pools):
    pool = pools("exact", workers=1, timeout_s=30.0)
    pool.map(calls("a"))
    os.kill(pool.pids[0], signal.SIGKILL)
    assert wait_gone(pool.pids, 10) == []
    results = pool.map(calls("a", "a", "b"))
    assert results[0].reason == "crash: the worker process was gone when the call was sent"
    assert [r.reward for r in results] == [0.0, 1.0, 0.0]


def test_non_finite_and_overflowing_values_are_the_rewards_fault(pools):
    pool = pools("bad_value", workers=1, timeout_s=30.0)
    results = pool.map(calls("nan", "inf", "big_int", "too_large", "str", "none", "fine"))
    assert [r.reason for r in results] == [
        "non-finite: returned nan", "non-finite: returned inf", "non-finite: returned int too large for a float",
        "out of range: returned 1e+39, beyond +-1e+12 (it would overflow the float32 advantages)",
        "bad return type: str", "bad return type: NoneType", None]
    assert results[-1].reward == 1.0


def test_stdout_of_the_reward_does_not_reach_the_protocol(pools, capfd):
    pool = pools("noisy", workers=1, timeout_s=30.0)
    assert [r.reward for r in pool.map(calls("a", "b"))] == [2.0, 2.0]
    assert "hello from the reward" in capfd.readouterr().err  # it went to stderr instead


def test_trl_convention_rewards_get_their_columns(pools):
    pool = pools("trl_length", workers=1, timeout_s=30.0, trl_convention=True)
    results = pool.map([RewardCall("p", "abc", "", None, {"weight": 2.0}),
                        RewardCall("p", "abcd", "", ({"role": "user", "content": "p"},), {"weight": 0.5})])
    assert [r.reward for r in results] == [6.0, 2.0]


def test_a_reward_a_worker_cannot_import_is_a_pool_error(pools):
    pool = pools("no_such_function", workers=1, timeout_s=30.0)
    with pytest.raises(RewardPoolError, match="could not import it: .*has no attribute 'no_such_function'"):
        pool.map(calls("a"))


def test_a_killed_call_takes_the_rewards_own_children_with_it(pools, tmp_path, monkeypatch):
    log = tmp_path / "log"
    monkeypatch.setenv("HOSTILE_LOG", str(log))
    pool = pools("child_then_hang", workers=1, timeout_s=1.0)
    (r,) = pool.map(calls("a"))
    assert r.kind == "timeout"
    (line,) = log.read_text().splitlines()
    child = int(line.split()[1])
    assert wait_gone([child], 10) == []


def test_close_kills_and_reaps_every_worker(pools):
    pool = pools("exact", workers=3, timeout_s=30.0)
    assert [r.reward for r in pool.map(calls("a", "b", "a"))] == [1.0, 0.0, 1.0]
    pids = pool.pids
    assert all(alive(p) for p in pids)
    pool.close()
    assert wait_gone(pids, 10) == []
    with pytest.raises(RewardPoolError, match="closed"):
        pool.map(calls("a"))


def test_an_interrupted_map_leaves_no_call_in_flight(pools):
    """An exception inside map (here from the selector) must not leave a busy worker whose late
    answer would be read as the answer to a later call."""
    pool = pools("sleep_on_4", workers=1, timeout_s=30.0)
    pool.map(calls("1"))  # started and ready
    real_select = pool._selector.select

    def interrupted(timeout=None):
        raise KeyboardInterrupt

    pool._selector.select = interrupted
    with pytest.raises(KeyboardInterrupt):
        pool.map(calls("4"))
    pool._selector.select = real_select
    assert [r.reward for r in pool.map(calls("2"))] == [2.0]


SCRIPT = textwrap.dedent("""
    import os, sys, threading, time
    sys.path.insert(0, {here!r})
    from tether.tasks.reward_pool import RewardCall, RewardPool
    pool = RewardPool("_hostile_rewards:sleep_on_4", workers=2, timeout_s={timeout})
    pool.map([RewardCall("p", "1", "a")])
    print(" ".join(map(str, pool.pids)), flush=True)
    threading.Thread(target=pool.map, args=([RewardCall("p", "4", "a")],), daemon=True).start()
    time.sleep(0.5)  # one worker is now inside a call that never returns
    {exit}
""")


@pytest.mark.parametrize("how, timeout, seconds", [
    ("sys.exit(0)", 600, 30),  # interpreter exit: atexit closes the pool, busy worker included
    ("os._exit(0)", 0.5, 60),  # the trainer dies outright: EOF ends the idle worker, the backstop the busy one
])
def test_no_worker_survives_its_trainer(how, timeout, seconds):
    code = SCRIPT.format(here=str(HERE), timeout=timeout, exit=how)
    proc = run_child([sys.executable, "-c", code], env=tether_env())  # the pool's workers have their own sessions
    assert proc.returncode == 0, proc.stderr
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 2
    assert wait_gone(pids, seconds) == []


def test_default_workers_fit_the_machine_and_the_batch():
    cores = len(os.sched_getaffinity(0))
    assert default_workers(1000) == cores
    assert default_workers(1) == 1


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="workers must be an int >= 1"):
        RewardPool("_hostile_rewards:exact", workers=0, timeout_s=1.0)
    with pytest.raises(ValueError, match="timeouts must be > 0"):
        RewardPool("_hostile_rewards:exact", workers=1, timeout_s=0)


def test_map_is_safe_to_call_from_another_thread_than_the_creator(pools):
    """The async loop scores from its producer thread; the pool it uses was made on the main thread."""
    pool = pools("exact", workers=1, timeout_s=30.0)
    out = []
    t = threading.Thread(target=lambda: out.extend(pool.map(calls("a", "b"))))
    t.start()
    t.join(60)
    assert [r.reward for r in out] == [1.0, 0.0]
