"""What a task is: a source of prompts with verifiable answers and a reward function."""

from __future__ import annotations

import hashlib
import json
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

    def cache_identity(self) -> dict:
        """What a warm start on this task depends on: the training rows in order (prompt, answer, solution),
        as a digest. Keyed by the file path instead, an edited file would load a stale warm start, the same
        rows at two paths would train twice, and two in-memory datasets (no path) would share one entry."""
        h = hashlib.sha256()
        for ex in self._train:
            h.update(json.dumps([ex.prompt, ex.answer, ex.solution]).encode())
            h.update(b"\n")
        return {"dataset_rows": len(self._train), "sha256": h.hexdigest()}

    @property
    def n_expert_solutions(self) -> int:
        """Training examples that carry an expert solution."""
        return sum(ex.solution is not None for ex in self._train)

    @property
    def has_expert_solutions(self) -> bool:
        return self.n_expert_solutions == len(self._train)
