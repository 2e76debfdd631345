"""SIGINT / SIGTERM end a run cleanly at a step boundary.

Inside ``StopOnSignal(run_dir)`` the first SIGINT or SIGTERM only records the request (and says so
on stderr); the loop finishes the current step, writes a checkpoint, and calls ``check(step)``, which
raises ``Interrupted`` once that checkpoint is written: the command prints one line saying how to resume, with no traceback. A
second signal abandons the step at once (``Interrupted`` without a step: the last checkpoint is
intact). Outside the main thread (a loop run from another thread) handlers cannot be installed and
the context does nothing.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

from tether.train.checkpoint import read_latest_name, step_name

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """The run was stopped by a signal. A BaseException (like KeyboardInterrupt), so no
    ``except Exception`` on the way up swallows it."""

    def __init__(self, signum: int, run_dir: Path, step: int | None) -> None:
        self.signum, self.run_dir, self.step = signum, Path(run_dir), step
        super().__init__(str(self))

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        resume = f"resume with: tether train --resume {self.run_dir}"
        if self.step is not None:
            return f"stopped by {name} after step {self.step}; checkpoint {step_name(self.step)} written; {resume}"
        latest = read_latest_name(self.run_dir / "checkpoints")
        kept = f"the last checkpoint {latest} is intact" if latest else "no checkpoint was written yet"
        return f"stopped by a second {name} during a step; {kept}; {resume}"


class StopOnSignal:
    """Record SIGINT / SIGTERM while the block runs; the loop polls ``requested()`` and ``check(step)``."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise Interrupted(signum, self.run_dir, step=None)
        self.signum = signum
        print(f"tether: {signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    def requested(self) -> bool:
        return self.signum is not None

    def check(self, step: int) -> None:
        """Call after the step boundary's checkpoint: raises ``Interrupted`` if a stop was requested and
        the checkpoint of ``step`` is written (a signal that came after the loop decided not to write
        one stops at the next boundary)."""
        if self.signum is not None and read_latest_name(self.run_dir / "checkpoints") == step_name(step):
            raise Interrupted(self.signum, self.run_dir, step=step)
