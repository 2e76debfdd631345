"""What a task is: a source of prompts with verifiable answers and a reward function."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Example:
    prompt: str
    """The text the model is conditioned on."""
    answer: str
    """The ground truth the reward function checks against."""
    solution: str | None = None
    """A reference completion (for SFT warm start / distillation); None if unknown."""


class Task(Protocol):
    name: str

    def sample(self, rng: random.Random) -> Example:
        """One training example drawn from the task's training distribution."""
        ...

    def eval_examples(self) -> list[Example]:
        """The fixed held-out evaluation split (never sampled for training)."""
        ...

    def reward(self, prompt: str, completion: str, answer: str) -> float:
        """Score one completion; must not raise on malformed completions (return 0)."""
        ...
