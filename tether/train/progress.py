"""Progress of every long phase (warm start, evaluation, training, distillation), seen wherever the run is watched.

* In a terminal (stdout and stderr both ttys): a rich bar on stderr with the latest key metrics.
* Anywhere else (``| cat``, ``> log``, ``nohup``, CI, a notebook): one plain line on stdout per ``log_every``
  steps, the first and the last step always, so a piped run shows output from its first step. ``log_every``
  none picks ``ceil(total / 10)``: about ten lines a phase, 20-40 lines for a default run.
* Always, when the run has a directory: the same plain lines appended to ``RUN/progress.log``.

A line reads ``RL 12/100  reward 0.312  loss 0.0123  ess 0.998  |dlogp| 2.4e-07  tok/s 1.2e+03  elapsed 0:00:12
eta 0:01:28``; one-off events (an evaluation's result, a warm start loaded from its cache) are ``note`` lines.
``enabled=False`` (``--no-progress``) silences the terminal and stdout; the log file is still written.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

SHOWN = ("reward/mean", "loss", "sft/loss", "meter/total/ess_token", "mismatch/abs_logp_diff_mean",
         "perf/tokens_per_s", "agent/success")
SHORT = {"reward/mean": "reward", "loss": "loss", "sft/loss": "loss", "meter/total/ess_token": "ess",
         "mismatch/abs_logp_diff_mean": "|dlogp|", "perf/tokens_per_s": "tok/s", "agent/success": "success"}
LINES_PER_PHASE = 10
"""Plain lines a phase prints when ``log_every`` is none (plus its first step)."""


def _fmt(v: Any) -> str:
    try:
        return f"{float(v):.3g}"
    except (TypeError, ValueError):
        return str(v)


def _clock(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def info_text(metrics: dict[str, Any]) -> str:
    """The shown metrics of one step, ``reward 0.312  loss 0.0123 ...`` (missing ones left out)."""
    seen: set[str] = set()
    parts = []
    for k in SHOWN:
        if k in metrics and SHORT[k] not in seen:
            seen.add(SHORT[k])
            parts.append(f"{SHORT[k]} {_fmt(metrics[k])}")
    return "  ".join(parts)


def plain_line(description: str, done: int, total: int, metrics: dict[str, Any], elapsed_s: float,
               done_here: int) -> str:
    """One progress line; the ETA extrapolates this session's pace (``done_here`` steps in ``elapsed_s``)."""
    eta = elapsed_s / done_here * (total - done) if done_here > 0 else float("nan")
    tail = f"elapsed {_clock(elapsed_s)}" + (f"  eta {_clock(eta)}" if math.isfinite(eta) else "")
    info = info_text(metrics)
    return f"{description} {done}/{total}  " + (f"{info}  " if info else "") + tail


def auto_every(total: int, log_every: int | None) -> int:
    """Steps between plain lines: ``log_every``, or about ``LINES_PER_PHASE`` lines over ``total`` steps."""
    if log_every is not None:
        return log_every
    return max(1, math.ceil(total / LINES_PER_PHASE))


@dataclass
class Reporter:
    """Where progress goes for one command: ``enabled`` (terminal / stdout), ``log_every``, ``log_path``.
    ``interactive`` none decides by whether stdout and stderr are terminals."""
    enabled: bool = True
    log_every: int | None = None
    log_path: Path | None = None
    interactive: bool | None = None
    stream: TextIO | None = None

    @classmethod
    def for_run(cls, cfg: Any, run_dir: Path | None) -> Reporter:
        """From a config with ``progress`` and ``log_every`` fields (train, distill)."""
        return cls(enabled=cfg.progress, log_every=getattr(cfg, "log_every", None),
                   log_path=None if run_dir is None else Path(run_dir) / "progress.log")

    @property
    def is_interactive(self) -> bool:
        if self.interactive is not None:
            return self.interactive
        return sys.stdout.isatty() and sys.stderr.isatty()

    def emit(self, line: str, *, to_stream: bool = True) -> None:
        """One plain line to the log file and (when enabled and not a terminal bar) to stdout."""
        if self.log_path is not None:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {line}\n")
        if to_stream and self.enabled:
            stream = self.stream or sys.stdout
            if self.is_interactive and self.stream is None:
                Console(stderr=True).print(line, markup=False, highlight=False)
            else:
                print(line, file=stream, flush=True)

    def note(self, line: str) -> None:
        """A one-off event: an evaluation's result, a phase that took no steps."""
        self.emit(line)

    def phase(self, description: str, total: int, start: int = 0) -> StepProgress:
        return StepProgress(total=total, start=start, description=description, reporter=self)


QUIET = Reporter(enabled=False)
"""Progress nowhere (library calls that pass no reporter)."""


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
    """One phase of ``total`` steps (``start`` already done, on resume): ``with ...: progress.advance(metrics)``.
    ``console`` prints messages (alarms, skipped steps) without breaking the bar."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True, description: str = "RL",
                 reporter: Reporter | None = None) -> None:
        self.reporter = reporter if reporter is not None else Reporter(enabled=enabled)
        self.total, self.done, self.start, self.description = total, start, start, description
        self.every = auto_every(total, self.reporter.log_every)
        self.bar = self.reporter.enabled and self.reporter.is_interactive and self.reporter.stream is None
        self.console = Console(stderr=True) if self.bar or self.reporter.stream is None else Console(
            file=self.reporter.stream)
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=self.console, disable=not self.bar,
        )
        self._task = self._progress.add_task(description, total=total, completed=start, info="")
        self._t0 = time.perf_counter()

    def __enter__(self) -> StepProgress:
        self._progress.__enter__()
        if not self.bar:
            self.reporter.emit(f"{self.description}: {self.total - self.start} steps"
                               + (f" (from step {self.start})" if self.start else ""))
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.__exit__(*exc)

    def advance(self, metrics: dict[str, Any] | None = None) -> None:
        metrics = metrics or {}
        self.done += 1
        self._progress.update(self._task, advance=1, info=info_text(metrics))
        if self.done == self.start + 1 or self.done % self.every == 0 or self.done == self.total:
            line = plain_line(self.description, self.done, self.total, metrics, time.perf_counter() - self._t0,
                              self.done - self.start)
            self.reporter.emit(line, to_stream=not self.bar)
