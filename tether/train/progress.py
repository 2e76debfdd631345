"""A rich progress bar for long loops, showing the latest key metrics; a no-op when disabled."""

from __future__ import annotations

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
