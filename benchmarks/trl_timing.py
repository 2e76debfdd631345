"""Shared by the TRL comparisons: a ``TrainerCallback`` that records the wall time of every optimiser step."""

from __future__ import annotations

import time


def step_timer():
    """A fresh callback whose ``times`` list gains one entry (seconds) per TRL training step."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.t0 = 0.0

        def on_step_begin(self, *args, **kwargs) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, *args, **kwargs) -> None:
            self.times.append(time.perf_counter() - self.t0)

    return StepTimer()
