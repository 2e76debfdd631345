"""Shared machinery of procedurally generated tasks: training sampling that never yields a held-out
problem, and a fixed evaluation split.

A subclass implements ``draw(rng) -> (key, Example)``, where ``key`` is the problem's canonical form
(two prompts that pose the same problem must share it). A problem is held out iff
``split.is_heldout(key, heldout_fraction, salt)``; ``sample`` redraws until it gets a problem that
is not, so training and evaluation problems are disjoint by construction. ``eval_examples`` draws
``eval_size`` distinct held-out problems from the same distribution with a fixed seed, so the
evaluation split depends on the config only, never on the training seed.
"""

from __future__ import annotations

import random

from tether.tasks.base import Example
from tether.tasks.split import is_heldout


class ProceduralTask:
    name: str = "procedural"
    salt: str = "tether"
    """Hash salt of the split (<= 16 bytes); changing it changes the held-out set."""
    heldout_fraction: float = 0.1
    eval_size: int = 200
    n_skipped: int = 0
    """Generated tasks have no bad rows; present so every task reports it like ``JsonlTask``."""

    @property
    def skipped_by_reason(self) -> dict[str, int]:
        return {}

    def draw(self, rng: random.Random) -> tuple[str, Example]:  # pragma: no cover - abstract
        raise NotImplementedError

    def is_heldout_key(self, key: str) -> bool:
        return is_heldout(key, self.heldout_fraction, self.salt)

    def sample(self, rng: random.Random) -> Example:
        """A training problem: drawn from the task distribution, never from the held-out split."""
        for _ in range(10_000):
            key, example = self.draw(rng)
            if not self.is_heldout_key(key):
                return example
        raise RuntimeError(f"{self.name}: no training problem found in 10000 draws (heldout_fraction too high?)")

    def eval_examples(self) -> list[Example]:
        """``eval_size`` distinct held-out problems, the same list for a given config on every call."""
        cached = getattr(self, "_eval_cache", None)
        if cached is not None:
            return list(cached)
        rng = random.Random(f"{self.salt}-eval")
        seen: set[str] = set()
        out: list[Example] = []
        budget = max(100_000, int(200 * self.eval_size / self.heldout_fraction))
        for _ in range(budget):
            key, example = self.draw(rng)
            if key in seen or not self.is_heldout_key(key):
                continue
            seen.add(key)
            out.append(example)
            if len(out) == self.eval_size:
                break
        else:
            raise ValueError(
                f"{self.name}: found only {len(out)} distinct held-out problems for eval_size={self.eval_size}; "
                "the problem space is too small: lower eval_size or make the task harder"
            )
        self._eval_cache = tuple(out)
        return list(out)
