"""Resolve a task by name or path: ``get_task("arithmetic", max_digits=3)``, ``get_task("data.jsonl",
reward="numeric")``. Each task has a typed, validated config dataclass; options are its fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from tether.tasks.arithmetic import ArithmeticConfig, ArithmeticTask
from tether.tasks.base import Task
from tether.tasks.countdown import CountdownConfig, CountdownTask
from tether.tasks.jsonl import JsonlConfig, JsonlTask
from tether.tasks.readers import READERS
from tether.tasks.text import TextCheck


@dataclass(frozen=True)
class TaskSpec:
    name: str
    config_cls: type
    build: type
    description: str


BUILTIN_TASKS: dict[str, TaskSpec] = {
    "arithmetic": TaskSpec("arithmetic", ArithmeticConfig, ArithmeticTask,
                           "multi-digit + - * problems like '12+7=' (knobs: min_digits, max_digits, ops)"),
    "countdown": TaskSpec("countdown", CountdownConfig, CountdownTask,
                          "reach a target from given numbers with + - * / (knobs: n_numbers, max_number, max_target)"),
}


def task_names() -> list[str]:
    return sorted(BUILTIN_TASKS)


def _make_config(cls: type, where: str, options: dict):
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {', '.join(unknown)}; valid options: {', '.join(names)}")
    return cls(**options)


def _looks_like_path(name: str) -> bool:
    return Path(name).suffix.lower() in READERS or "/" in name or "\\" in name or Path(name).exists()


def get_task(name_or_path: str, *, text_check: TextCheck | None = None, **options) -> Task:
    """A built-in task by name, or a ``JsonlTask`` for a dataset path (.jsonl / .csv).

    ``options`` are fields of the task's config (``ArithmeticConfig``, ``CountdownConfig`` or
    ``JsonlConfig``); options whose value is None are treated as not given, so a caller can pass
    its optional settings through unconditionally. Unknown names or options raise ``ValueError``
    listing the valid ones. ``text_check`` (a dataset file): the model's tokenizer check; rows it
    refuses are bad rows (built-in tasks generate only text every tokenizer encodes).
    """
    options = {k: v for k, v in options.items() if v is not None}
    if name_or_path in BUILTIN_TASKS:
        spec = BUILTIN_TASKS[name_or_path]
        return spec.build(_make_config(spec.config_cls, f"task {name_or_path!r}", options))
    if _looks_like_path(name_or_path):
        from tether.tasks.trl_data import trl_task_from_path, wants_trl_task

        if wants_trl_task(name_or_path, options):  # TRL formats, Parquet, TRL-convention rewards
            return trl_task_from_path(name_or_path, options)
        if "path" in options:
            raise ValueError(f"task {name_or_path!r}: the path is given twice (drop the 'path' option)")
        return JsonlTask(_make_config(JsonlConfig, f"dataset task {name_or_path!r}", {"path": name_or_path, **options}),
                         text_check=text_check)
    raise ValueError(
        f"unknown task {name_or_path!r}: built-in tasks are {', '.join(task_names())}; "
        f"or give a dataset file path ({', '.join(sorted(READERS))})"
    )
