"""Reward worker processes: user rewards run outside the trainer, under hard timeouts.

``RewardPool(spec, workers=n, timeout_s=t)`` starts ``n`` worker processes, each a fresh interpreter
(``tether.tasks.reward_worker``) that imports the reward by its spec (``module:function`` or
``/path/file.py:function``; no code is ever sent to it). ``pool.map(calls)`` scores a batch: every
call goes to an idle worker, one call per worker at a time, so at most ``n`` calls are in flight and
the rest wait in ``map``'s own list (nothing queues up beyond the batch). A call with no answer after
``timeout_s`` seconds gets its worker killed (SIGKILL to the worker's process group, so C code holding
the GIL, a blocked socket and the reward's own child processes all stop) and replaced; a worker that
dies during a call (``os._exit``, a segfault, the OOM killer) is replaced too. Either way that one
call is one failed sample (``timeout: ...`` / ``crash: ...``) and the other calls are unaffected.
Answers come back as JSON, so the trainer never unpickles anything a reward produced, and are checked
again against the failure rule of ``tether.tasks.rewards``.

``pool.stats`` counts ``calls``, ``failed``, ``timeouts``, ``crashes`` and ``restarts``.
``close()`` kills and reaps every worker; pools still open at interpreter exit are closed then, an
idle worker whose trainer died exits at the end of its input, and a busy one ends itself
``2 * timeout_s + 10`` seconds after its call started (``reward_worker``'s backstop timer).

Workers are started with ``subprocess``, not ``multiprocessing``: its ``spawn`` and ``forkserver``
starts re-import the trainer's ``__main__`` in every worker (a training script without an
``if __name__ == "__main__"`` guard would run again), and ``fork`` copies the trainer's threads and
tensors. Each worker runs in its own session, so a Ctrl-C in the terminal reaches the trainer only.
POSIX only (Linux, macOS).
"""

from __future__ import annotations

import atexit
import json
import os
import pickle
import selectors
import signal
import subprocess
import sys
import time
import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tether
from tether.tasks.reward_worker import HEADER, MAX_FRAME, frame
from tether.tasks.rewards import ScoreResult, to_reward

_ROOT = str(Path(tether.__file__).resolve().parents[1])
_BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); "
         "from tether.tasks.reward_worker import main; raise SystemExit(main())")


class RewardPoolError(RuntimeError):
    """The pool cannot score at all: a worker cannot start or import the reward, or the pool is closed."""


@dataclass(frozen=True)
class RewardCall:
    """One sample to score: the reward's arguments, and a TRL-format row's chat prompt and columns."""

    prompt: str
    completion: str
    answer: str
    messages: tuple[dict, ...] | None = None
    fields: dict[str, Any] | None = None


def default_workers(batch: int) -> int:
    """A pool sized to the machine: one worker per usable CPU core, never more than the batch."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, batch))


@dataclass(eq=False)
class _Worker:
    proc: subprocess.Popen
    deadline: float
    """When its start-up or its current call runs out of time (monotonic clock)."""
    ready: bool = False
    call: int | None = None
    """Index of the call it is scoring, if any."""
    buf: bytearray = field(default_factory=bytearray)


_LIVE: weakref.WeakSet[RewardPool] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for pool in list(_LIVE):
        pool.close()


class RewardPool:
    """Worker processes scoring one reward; see the module docstring.

    Args:
        spec: what each worker imports, ``module:function`` or ``/abs/path/file.py:function``.
        workers: number of worker processes (>= 1).
        timeout_s: per-call limit in seconds; a call over it is killed and fails.
        trl_convention: the reward takes ``(prompts=, completions=, **columns)`` (TRL), not
            ``(prompt, completion, answer)``.
        name: what messages call the reward (default: ``spec``).
        start_timeout_s: limit for a worker to start and import the reward.
    """

    def __init__(self, spec: str, *, workers: int, timeout_s: float, trl_convention: bool = False,
                 name: str | None = None, start_timeout_s: float = 60.0) -> None:
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"RewardPool: workers must be an int >= 1, got {workers!r}")
        if not timeout_s > 0 or not start_timeout_s > 0:
            raise ValueError(f"RewardPool: timeouts must be > 0, got {timeout_s}, {start_timeout_s}")
        self.spec, self.name = spec, name or spec
        self.timeout_s, self.start_timeout_s = float(timeout_s), float(start_timeout_s)
        self.stats: Counter[str] = Counter(calls=0, failed=0, timeouts=0, crashes=0, restarts=0)
        self._setup = pickle.dumps({"spec": spec, "trl": trl_convention, "sys_path": list(sys.path),
                                    "backstop_s": 2 * self.timeout_s + 10})
        self._selector = selectors.DefaultSelector()
        self._workers: list[_Worker] = []
        self._closed = False
        _LIVE.add(self)
        try:
            for _ in range(workers):
                self._workers.append(self._spawn())
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------- public

    @property
    def pids(self) -> list[int]:
        """Process ids of the current workers (replaced workers get new ones)."""
        return [w.proc.pid for w in self._workers]

    def map(self, calls: Sequence[RewardCall]) -> list[ScoreResult]:
        """Score every call, in order; a timed-out or crashed call is one failed result."""
        if self._closed:
            raise RewardPoolError(f"reward {self.name!r}: the worker pool is closed")
        results: list[ScoreResult | None] = [None] * len(calls)
        todo = list(range(len(calls)))[::-1]  # a stack: pop() takes the next call in order
        try:
            while todo or any(w.call is not None for w in self._workers):
                self._dispatch(calls, todo)
                self._wait(results, todo)
        except BaseException:
            for w in list(self._workers):  # a busy worker would answer a call that no longer exists
                if w.call is not None:
                    self._replace(w)
            raise
        self.stats["calls"] += len(calls)
        self.stats["failed"] += sum(r.failed for r in results)
        return results  # type: ignore[return-value]  (every slot is filled once the loop ends)

    def close(self) -> None:
        """Kill and reap every worker; idempotent."""
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            self._kill(w)
        self._workers = []
        self._selector.close()
        _LIVE.discard(self)

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------ workers

    def _spawn(self) -> _Worker:
        proc = subprocess.Popen([sys.executable, "-c", _BOOT, _ROOT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                bufsize=0, start_new_session=True)
        w = _Worker(proc, deadline=time.monotonic() + self.start_timeout_s)
        self._selector.register(proc.stdout, selectors.EVENT_READ, w)
        self._send(w, self._setup)  # if it died at once, its end of output shows up as a failed start
        return w

    def _send(self, w: _Worker, payload: bytes) -> bool:
        data, fd = frame(payload), w.proc.stdin.fileno()
        try:
            while data:
                data = data[os.write(fd, data):]
            return True
        except OSError:  # BrokenPipeError: the worker is gone
            return False

    def _kill(self, w: _Worker) -> None:
        """SIGKILL the worker's process group (itself and the children its reward started) and reap it."""
        if w.proc.returncode is None:  # never signal a reaped pid: it may belong to someone else by now
            try:
                os.killpg(w.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                w.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            self._selector.unregister(w.proc.stdout)
        except (KeyError, ValueError):
            pass
        for f in (w.proc.stdin, w.proc.stdout):
            try:
                f.close()
            except OSError:
                pass

    def _replace(self, w: _Worker) -> None:
        self._kill(w)
        self.stats["restarts"] += 1
        self._workers[self._workers.index(w)] = self._spawn()

    # ---------------------------------------------------------------------------- scheduling

    def _dispatch(self, calls: Sequence[RewardCall], todo: list[int]) -> None:
        for w in list(self._workers):
            if not todo or not w.ready or w.call is not None:
                continue
            i = todo.pop()
            c = calls[i]
            request = pickle.dumps((c.prompt, c.completion, c.answer, c.messages, c.fields))
            if self._send(w, request):
                w.call, w.deadline = i, time.monotonic() + self.timeout_s
            else:  # it died while idle, before this call reached it: not the call's fault
                todo.append(i)
                self._replace(w)

    def _wait(self, results: list[ScoreResult | None], todo: list[int]) -> None:
        waiting = [w for w in self._workers if not w.ready or w.call is not None]
        if not waiting:
            return
        timeout = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
        for key, _ in self._selector.select(timeout):
            self._read(key.data, results)
        now = time.monotonic()
        for w in list(self._workers):
            if w in waiting and (not w.ready or w.call is not None) and w.deadline <= now:
                if not w.ready:
                    self._kill(w)
                    raise RewardPoolError(f"reward {self.name!r}: a worker process did not import it within "
                                          f"{self.start_timeout_s:g} s")
                results[w.call] = ScoreResult(0.0, True, f"timeout: no result within {self.timeout_s:g} s; "
                                                         "the worker process was killed")
                self.stats["timeouts"] += 1
                self._replace(w)

    def _read(self, w: _Worker, results: list[ScoreResult | None]) -> None:
        try:
            data = os.read(w.proc.stdout.fileno(), 1 << 16)
        except OSError:
            data = b""
        if not data:  # end of output: the worker is gone
            self._kill(w)
            code = w.proc.returncode
            if not w.ready:
                raise RewardPoolError(f"reward {self.name!r}: a worker process exited during start-up "
                                      f"(exit code {code}); see its messages above")
            if w.call is not None:
                results[w.call] = ScoreResult(0.0, True, f"crash: the worker process died during the call "
                                                         f"(exit code {code})")
                self.stats["crashes"] += 1
                w.call = None
            self._replace(w)
            return
        w.buf += data
        while len(w.buf) >= HEADER.size:
            (n,) = HEADER.unpack_from(w.buf)
            if n > MAX_FRAME:
                return self._protocol_error(w, results, f"a frame of {n} bytes")
            if len(w.buf) < HEADER.size + n:
                return
            payload = bytes(w.buf[HEADER.size:HEADER.size + n])
            del w.buf[:HEADER.size + n]
            try:
                message = json.loads(payload)
            except ValueError:
                return self._protocol_error(w, results, "a frame that is not JSON")
            if not self._handle(w, message, results):
                return self._protocol_error(w, results, f"the unexpected message {str(message)[:100]!r}")

    def _handle(self, w: _Worker, message: Any, results: list[ScoreResult | None]) -> bool:
        if not isinstance(message, dict) or len(message) != 1:
            return False
        (key, value), = message.items()
        if not w.ready:
            if key == "ready" and value is True:
                w.ready = True
                return True
            if key == "error" and isinstance(value, str):
                self._kill(w)
                raise RewardPoolError(f"reward {self.name!r}: a worker process could not import it: {value}")
            return False
        if w.call is None:
            return False
        if key == "reward" and isinstance(value, (int, float)) and not isinstance(value, bool):
            results[w.call] = to_reward(value)  # checked again: the worker is not trusted
        elif key == "failed" and isinstance(value, str):
            results[w.call] = ScoreResult(0.0, True, value[:300])
        else:
            return False
        w.call = None
        return True

    def _protocol_error(self, w: _Worker, results: list[ScoreResult | None], what: str) -> None:
        if w.call is not None:
            results[w.call] = ScoreResult(0.0, True, f"crash: the worker process sent {what}")
            self.stats["crashes"] += 1
        self._replace(w)
