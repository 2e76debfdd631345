"""Child processes started by tests, stopped on every exit path (issue 22).

Every child starts in its own session, hence its own process group, and leaves ``started`` only
after the whole group has been sent SIGKILL and the child reaped: whether the test passed, failed an
assert, timed out in ``communicate`` or was interrupted by pytest-timeout, nothing it started
(a ``tether train``, a server that child started) is left running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from tests.limits import CHILD_TIMEOUT_S

ROOT = Path(__file__).resolve().parents[1]


def tether_command(*args: str) -> list[str]:
    """``python -m tether ARGS`` with the interpreter running the tests."""
    return [sys.executable, "-m", "tether", *args]


def tether_env(**extra: str) -> dict[str, str]:
    """This process's environment with ``import tether`` resolving to this checkout."""
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


@contextmanager
def started(args: Sequence[str], *, cwd: str | Path = ROOT, env: Mapping[str, str] | None = None,
            **popen_kw) -> Iterator[subprocess.Popen]:
    """``Popen(args)`` in a new process group; on leaving, the group is killed and the child reaped."""
    proc = subprocess.Popen(list(args), cwd=str(cwd), env=None if env is None else dict(env),
                            start_new_session=True, **popen_kw)
    try:
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """SIGKILL the process group ``proc`` leads (the child and anything it started), reap the child
    and close its pipes. Safe to call on a child that has already exited."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the group is empty: the child and everything it started have exited
        pass
    proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def alive(pid: int) -> bool:
    """Whether process ``pid`` is still running (a zombie, exited but not yet reaped, is not)."""
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state


def run(args: Sequence[str], *, timeout: float = CHILD_TIMEOUT_S, check: bool = False, cwd: str | Path = ROOT,
        env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``args`` to completion with text stdout / stderr captured, like ``subprocess.run``, but in
    its own process group, killed with everything it started on any exit (``TimeoutExpired`` after
    ``timeout`` seconds included). ``check=True`` raises ``CalledProcessError`` on a non-zero exit."""
    with started(args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, text=True) as proc:
        out, err = proc.communicate(timeout=timeout)
    done = subprocess.CompletedProcess(list(args), proc.returncode, out, err)
    if check:
        done.check_returncode()
    return done
