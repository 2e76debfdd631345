"""What the async loop's two threads share: the published weights and the engine itself.

``WeightBoard``: the trainer publishes a copy of its weights per version; the producer waits for a
version and reads it. ``EngineLease``: one user of the engine at a time (the producer's chunks, the
trainer's ``drop`` refills). See tether/train/async_loop.py and docs/async.md.
"""

from __future__ import annotations

import threading

import torch


class WeightBoard:
    """Weights the trainer publishes per version; the producer waits on and reads them."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.latest = -1
        self.closed = False
        self._cond = threading.Condition()

    def publish(self, version: int, state: dict[str, torch.Tensor]) -> None:
        with self._cond:
            self.weights[version] = state
            self.latest = max(self.latest, version)
            for v in [v for v in self.weights if v < self.latest - self.keep]:
                del self.weights[v]
            self._cond.notify_all()

    def wait_for(self, version: int) -> None:
        with self._cond:
            while self.latest < version and not self.closed:
                self._cond.wait(0.5)
            if self.closed:
                raise BoardClosed

    def get(self, version: int) -> dict[str, torch.Tensor]:
        with self._cond:
            return self.weights[version]

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


class BoardClosed(Exception):
    """Raised in a thread waiting on a closed board (the run is ending)."""


class EngineLease:
    """The engine is shared by the producer (batches) and the trainer (``drop`` refills): one user at a
    time. The producer holds it chunk by chunk and never while it waits for a version, which only the
    trainer can publish. ``release`` is a no-op for a thread that does not hold it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._mine = threading.local()

    def acquire(self) -> None:
        self._lock.acquire()
        self._mine.held = True

    def release(self) -> None:
        if getattr(self._mine, "held", False):
            self._mine.held = False
            self._lock.release()

    def __enter__(self) -> EngineLease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
