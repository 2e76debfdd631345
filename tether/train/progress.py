"""A rich progress bar for long loops, showing the latest key metrics; a no-op when disabled."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

SHOWN = ("reward/mean", "loss", "meter/total/ess_token", "mismatch/abs_logp_diff_mean")
SHORT = {"reward/mean": "reward", "loss": "loss", "meter/total/ess_token": "ess", "mismatch/abs_logp_diff_mean": "|Δlogp|"}


def _fmt(v: Any) -> str:
    try:
        return f"{float(v):.3g}"
    except (TypeError, ValueError):
        return str(v)


class Stopwatch:
    """Wall time per named phase of one step: ``with clock("rollout"): ...``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def add(self, name: str, seconds: float) -> None:
        """Count ``seconds`` measured elsewhere (a batch's own rollout / score times) as phase ``name``."""
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def total(self) -> float:
        return sum(self.seconds.values())

    def metrics(self) -> dict[str, float]:
        return {f"time/{k}_s": v for k, v in self.seconds.items()}


class StepProgress:
    def __init__(self, total: int, start: int = 0, enabled: bool = True, description: str = "RL") -> None:
        self.console = Console(stderr=True)
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=self.console, disable=not enabled,
        )
        self._task = self._progress.add_task(description, total=total, completed=start, info="")

    def __enter__(self) -> StepProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.__exit__(*exc)

    def advance(self, metrics: dict[str, Any]) -> None:
        info = "  ".join(f"{SHORT[k]} {_fmt(metrics[k])}" for k in SHOWN if k in metrics)
        self._progress.update(self._task, advance=1, info=info)
