"""Reward worker processes: user rewards run outside the trainer, under hard timeouts.

``RewardPool(spec, workers=n, timeout_s=t)`` starts ``n`` worker processes, each a fresh interpreter
(``tether.tasks.reward_worker``) that imports the reward by its spec (``module:function`` or
``/path/file.py:function``; no code is ever sent to it). ``pool.map(calls)`` scores a batch: the
calls go to idle workers in chunks, and each worker runs one call at a time, answering each as it
finishes; nothing queues up beyond the batch. A call with no answer ``timeout_s`` seconds after it
started gets its worker killed (SIGKILL to the worker's process group, so C code holding
the GIL, a blocked socket and the reward's own child processes all stop) and replaced; a worker that
dies during a call (``os._exit``, a segfault, the OOM killer) is replaced too. Either way that one
call is one failed sample (``timeout: ...`` / ``crash: ...``); the calls of its chunk that had not
started are sent again, and the other workers' calls are unaffected.
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
import math
import os
import pickle
import select
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
MAX_CHUNK = 64
"""Most calls sent to one worker at once."""
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
    completion_ids: tuple[int, ...] | None = None
    """The completion's token ids (TRL-convention rewards get them as ``completion_ids``)."""


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
    calls: list[int] = field(default_factory=list)
    """Indices of the calls sent to it and not answered yet, in order; the first is running."""
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
            while todo or any(w.calls for w in self._workers):
                self._dispatch(calls, todo, results)
                self._wait(results, todo)
        except BaseException:
            for w in list(self._workers):  # a busy worker would answer calls that no longer exist
                if w.calls:
                    self._replace(w)
            raise
        self.stats["calls"] += len(calls)
        self.stats["failed"] += sum(r.failed for r in results)
        return results  # type: ignore[return-value]  (every slot is filled once the loop ends)

    def call_batch(self, calls: Sequence[RewardCall], state: dict[str, int]) -> tuple[list[ScoreResult], dict]:
        """One call of a batched (TRL-convention) reward on every sample, in one worker, under ``timeout_s``.
        Returns a result per sample and what the reward logged (``log_metric``). A call that raises,
        times out (its worker is killed) or crashes fails every sample of the batch."""
        if self._closed:
            raise RewardPoolError(f"reward {self.name!r}: the worker pool is closed")
        w = self._workers[0]
        try:
            while not w.ready:  # a fresh worker: wait for its import to finish
                message = self._next_message(w, w.deadline)
                if message in ("timeout", "eof"):
                    self._kill(w)
                    raise RewardPoolError(f"reward {self.name!r}: a worker process did not import it within "
                                          f"{self.start_timeout_s:g} s" if message == "timeout" else
                                          f"reward {self.name!r}: a worker process exited during start-up (exit "
                                          f"code {w.proc.returncode}); see its messages above")
                if not self._handle(w, message, []):
                    self._replace(w)
                    raise RewardPoolError(f"reward {self.name!r}: a worker process sent {str(message)[:100]!r}")
            rows = [(c.prompt, c.completion, c.answer, c.messages, c.fields, c.completion_ids) for c in calls]
            message = self._next_message(w, time.monotonic() + self.timeout_s,
                                         pickle.dumps({"batch": rows, "state": dict(state)}))
        except RewardPoolError:
            raise
        except BaseException:  # interrupted while the worker was busy: it would answer a call that no longer exists
            self._replace(w)
            raise
        results, logged, stat = self._batch_answer(message, len(calls))
        if stat:
            self.stats[stat] += 1
            self._replace(w)
        self.stats["calls"] += len(calls)
        self.stats["failed"] += sum(r.failed for r in results)
        return results, logged

    def _next_message(self, w: _Worker, deadline: float, request: bytes | None = None) -> Any:
        """Send ``request`` (if any), then the worker's next JSON message; 'timeout' or 'eof' if none came."""
        if request is not None and not self._send(w, request):
            return "eof"
        fd = w.proc.stdout.fileno()
        while True:
            if len(w.buf) >= HEADER.size:
                (n,) = HEADER.unpack_from(w.buf)
                if n > MAX_FRAME:
                    return "eof"
                if len(w.buf) >= HEADER.size + n:
                    payload = bytes(w.buf[HEADER.size:HEADER.size + n])
                    del w.buf[:HEADER.size + n]
                    try:
                        return json.loads(payload)
                    except ValueError:
                        return "eof"
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return "timeout"
            try:
                data = os.read(fd, 1 << 16)
            except OSError:
                data = b""
            if not data:
                return "eof"
            w.buf += data

    def _batch_answer(self, message: Any, n: int) -> tuple[list[ScoreResult], dict, str | None]:
        """A worker's answer to a batch: (results, logged metrics, the stat of a killed worker or None)."""
        if message == "timeout":
            reason = f"timeout: no result within {self.timeout_s:g} s for the batch; the worker process was killed"
            return [ScoreResult(0.0, True, reason)] * n, {}, "timeouts"
        if isinstance(message, dict) and isinstance(message.get("failed"), str):
            tb = message.get("traceback")
            failed = ScoreResult(0.0, True, message["failed"][:300], tb[:4000] if isinstance(tb, str) else None)
            return [failed] * n, {}, None
        values, logged = (message.get("batch"), message.get("metrics")) if isinstance(message, dict) else (None, None)
        ok = (isinstance(values, list) and len(values) == n and isinstance(logged, dict)
              and all(isinstance(v, list) and len(v) == 2 for v in values))
        if ok:
            results = []
            for value, reason in values:
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    results.append(to_reward(value))  # checked again: the worker is not trusted
                else:
                    results.append(ScoreResult(0.0, True, str(reason)[:300]))
            metrics = {str(k)[:100]: float(v) for k, v in logged.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
            return results, metrics, None
        what = "died during the call" if message == "eof" else f"sent {str(message)[:100]!r}"
        return [ScoreResult(0.0, True, f"crash: the worker process {what}")] * n, {}, "crashes"

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
    # Calls go out in chunks (one wake-up of the worker per chunk, not per call): a chunk is a
    # (2 x workers)-th of what is left, so the last ones are small and the workers finish together.
    # The worker answers each call as it finishes; the deadline is per call (timeout_s after the
    # previous answer). A killed or dead worker fails the call it was running; the rest of its chunk
    # had not started and goes back to be sent again.

    def _dispatch(self, calls: Sequence[RewardCall], todo: list[int], results: list[ScoreResult | None]) -> None:
        for w in list(self._workers):
            if not todo or not w.ready or w.calls:
                continue
            n = min(len(todo), MAX_CHUNK, -(-len(todo) // (2 * len(self._workers))))
            chunk = [todo.pop() for _ in range(n)]
            request = pickle.dumps([(c.prompt, c.completion, c.answer, c.messages, c.fields)
                                    for c in (calls[i] for i in chunk)])
            if self._send(w, request):
                w.calls, w.deadline = chunk, time.monotonic() + self.timeout_s
            else:  # it died while idle (its reward's module, the OOM killer): fail one call rather than retry forever
                results[chunk[0]] = ScoreResult(0.0, True, "crash: the worker process was gone when the call was sent")
                self.stats["crashes"] += 1
                todo.extend(reversed(chunk[1:]))
                self._replace(w)

    def _wait(self, results: list[ScoreResult | None], todo: list[int]) -> None:
        waiting = [w for w in self._workers if not w.ready or w.calls]
        if not waiting:
            return
        timeout = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
        for key, _ in self._selector.select(timeout):
            self._read(key.data, results, todo)
        now = time.monotonic()
        for w in list(self._workers):
            if w in waiting and (not w.ready or w.calls) and w.deadline <= now:
                if not w.ready:
                    self._kill(w)
                    raise RewardPoolError(f"reward {self.name!r}: a worker process did not import it within "
                                          f"{self.start_timeout_s:g} s")
                self._fail_running(w, results, todo, f"timeout: no result within {self.timeout_s:g} s; the worker "
                                                     "process was killed", "timeouts")

    def _fail_running(self, w: _Worker, results, todo: list[int], reason: str, stat: str) -> None:
        """The call ``w`` was running fails with ``reason``; its unstarted calls go back; ``w`` is replaced."""
        results[w.calls[0]] = ScoreResult(0.0, True, reason)
        self.stats[stat] += 1
        todo.extend(reversed(w.calls[1:]))
        w.calls = []
        self._replace(w)

    def _read(self, w: _Worker, results: list[ScoreResult | None], todo: list[int]) -> None:
        try:
            data = os.read(w.proc.stdout.fileno(), 1 << 16)
        except OSError:
            data = b""
        if not data:  # end of output: the worker is gone
            self._kill(w)
            if not w.ready:
                raise RewardPoolError(f"reward {self.name!r}: a worker process exited during start-up "
                                      f"(exit code {w.proc.returncode}); see its messages above")
            if w.calls:
                self._fail_running(w, results, todo, "crash: the worker process died during the call (exit code "
                                                     f"{w.proc.returncode})", "crashes")
            else:
                self._replace(w)
            return
        w.buf += data
        while len(w.buf) >= HEADER.size:
            (n,) = HEADER.unpack_from(w.buf)
            if n > MAX_FRAME:
                return self._protocol_error(w, results, todo, f"a frame of {n} bytes")
            if len(w.buf) < HEADER.size + n:
                return
            payload = bytes(w.buf[HEADER.size:HEADER.size + n])
            del w.buf[:HEADER.size + n]
            try:
                message = json.loads(payload)
            except ValueError:
                return self._protocol_error(w, results, todo, "a frame that is not JSON")
            if not self._handle(w, message, results):
                return self._protocol_error(w, results, todo, f"the unexpected message {str(message)[:100]!r}")

    def _handle(self, w: _Worker, message: Any, results: list[ScoreResult | None]) -> bool:
        if not isinstance(message, dict) or not message:
            return False
        message = dict(message)
        tb = message.pop("traceback", None)  # a failed call's traceback, shown if the failure stops the run
        if len(message) != 1 or not (tb is None or isinstance(tb, str)):
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
        if not w.calls:
            return False
        if key == "reward" and isinstance(value, (int, float)) and not isinstance(value, bool):
            results[w.calls[0]] = to_reward(value)  # checked again: the worker is not trusted
        elif key == "failed" and isinstance(value, str):
            results[w.calls[0]] = ScoreResult(0.0, True, value[:300], tb[:4000] if tb else None)
        else:
            return False
        w.calls.pop(0)
        w.deadline = time.monotonic() + self.timeout_s  # the next call of its chunk starts now
        return True

    def _protocol_error(self, w: _Worker, results, todo: list[int], what: str) -> None:
        if w.calls:
            self._fail_running(w, results, todo, f"crash: the worker process sent {what}", "crashes")
        else:
            self._replace(w)
