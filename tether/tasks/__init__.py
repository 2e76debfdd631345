"""Verifiable tasks: built-in procedural ones (arithmetic, countdown), dataset files, reward functions.

``get_task(name_or_path, **options)`` is the entry point; see docs/tasks.md.
"""

from tether.tasks.base import Example, Task
from tether.tasks.registry import get_task, task_names

__all__ = ["Example", "Task", "get_task", "task_names"]
