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
    """A reference (expert) completion: the SFT warm start's target, the expert row of CalibRL /
    RL-PLUS, the privileged context of OPSD; None if unknown."""


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


class DatasetExperts:
    """Expert-solution coverage of a task with a fixed training set (mixed into dataset tasks).

    ``has_expert_solutions`` is what the trainer checks before an expert preset (CalibRL, RL-PLUS)
    may run: every training example must carry a solution. Generated tasks whose every problem has
    one set ``has_expert_solutions = True`` themselves.
    """

    _train: list[Example]

    @property
    def n_expert_solutions(self) -> int:
        """Training examples that carry an expert solution."""
        return sum(ex.solution is not None for ex in self._train)

    @property
    def has_expert_solutions(self) -> bool:
        return self.n_expert_solutions == len(self._train)
