"""The test helper that starts child processes (tests/processes.py) leaves nothing running (issue 22)."""

import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.processes import ROOT, alive, run, started

pytestmark = pytest.mark.unit

# a child that starts a grandchild, prints the grandchild's pid, then waits for it
PARENT_OF_SLEEPER = ["sh", "-c", "sleep 600 & echo $! > \"$0\"; wait", "PIDFILE"]


def _pid_from(path: Path) -> int:
    while not path.exists() or not path.read_text().strip():  # pytest-timeout is the safety net
        time.sleep(0.01)
    return int(path.read_text())


def _gone(pid: int, wait_s: float = 60.0) -> bool:
    """SIGKILL is delivered asynchronously: poll for a while (a long while: the machine may be busy)."""
    deadline = time.monotonic() + wait_s
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    return not alive(pid)


def _command(pidfile: Path) -> list[str]:
    return [*PARENT_OF_SLEEPER[:3], str(pidfile)]


def test_started_kills_child_and_grandchild_when_the_test_fails(tmp_path):
    pidfile = tmp_path / "pid"
    with pytest.raises(AssertionError, match="a failing check"):
        with started(_command(pidfile)) as child:
            sleeper = _pid_from(pidfile)
            assert alive(sleeper) and child.poll() is None
            raise AssertionError("a failing check")
    assert child.returncode is not None  # reaped, not a zombie
    assert _gone(sleeper)


def test_run_timeout_kills_the_whole_group(tmp_path):
    pidfile = tmp_path / "pid"
    with pytest.raises(subprocess.TimeoutExpired):
        run(_command(pidfile), timeout=0.5)
    assert _gone(_pid_from(pidfile))


def test_run_returns_output_and_code_and_checks():
    done = run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")
    with pytest.raises(subprocess.CalledProcessError):
        run(["sh", "-c", "exit 3"], check=True)


def test_no_test_starts_a_process_without_the_helper():
    """Every test that starts a process goes through tests/processes.py, so it is stopped on every exit path."""
    direct = re.compile(r"\bsubprocess\.(run|Popen|call|check_call|check_output)\(|\bos\.(system|popen|spawn\w*)\(")
    # _hostile_rewards.py is not a test: it is a reward module whose 'child_then_hang' starts a child on purpose, to
    # check that the reward pool kills a hung reward's whole process group (tests/unit/test_reward_pool.py)
    exempt = {"processes.py", "_hostile_rewards.py"}
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("*.py")
                 if p.name not in exempt and direct.search(p.read_text())]
    assert not offenders, f"start processes with tests.processes.run / started: {offenders}"


class _Item:
    def __init__(self, *marks):
        self.marks = [getattr(pytest.mark, m) if isinstance(m, str) else m for m in marks]

    def get_closest_marker(self, name):
        return next((m.mark for m in self.marks if m.mark.name == name), None)

    def add_marker(self, mark):
        self.marks.append(mark)


def test_engine_and_e2e_tests_get_the_busy_machine_limit():
    from tests.conftest import pytest_collection_modifyitems
    from tests.limits import E2E_TIMEOUT_S, HEAVY_TIMEOUT_S

    unit, engine, e2e = _Item("unit"), _Item("engine"), _Item("e2e")
    heavy = _Item("e2e", pytest.mark.timeout(HEAVY_TIMEOUT_S))
    pytest_collection_modifyitems([unit, engine, e2e, heavy])
    limits = [None if (m := i.get_closest_marker("timeout")) is None else m.args[0] for i in (unit, engine, e2e, heavy)]
    assert limits == [None, E2E_TIMEOUT_S, E2E_TIMEOUT_S, HEAVY_TIMEOUT_S]


def test_no_two_test_files_share_a_name():
    """The test folders are not packages, so pytest imports each test file by its bare name: two files with one name
    in two folders make the second fail to collect ("import file mismatch")."""
    names: dict[str, list[str]] = {}
    for p in (ROOT / "tests").rglob("test_*.py"):
        names.setdefault(p.name, []).append(str(p.relative_to(ROOT)))
    assert not {n: ps for n, ps in names.items() if len(ps) > 1}


def test_every_test_folder_is_collected(pytestconfig):
    """pytest skips folders matching norecursedirs (its default holds "dist", which once left tests/dist out of
    every `make test`): each folder under tests/ that holds a test file must survive that list."""
    import fnmatch

    patterns = pytestconfig.getini("norecursedirs")
    folders = {p.parent for p in (ROOT / "tests").rglob("test_*.py")}
    skipped = [str(f.relative_to(ROOT)) for f in folders
               if any(fnmatch.fnmatch(part, pat) for part in f.relative_to(ROOT).parts for pat in patterns)]
    assert not skipped, f"pytest would not collect {skipped} (norecursedirs {patterns})"
