"""Per-step seeds: every random draw of step ``s`` comes from a generator seeded by ``(seed, s, salt)``.

``salt`` tells apart the draws of one step (the loops use 0 for the prompts, 1 for the rollout, 2 for the
mini-batch order, and more for refills and chunks), so two draws never share a generator. Because the
seed is a function of the step alone, a run resumed at step ``s`` draws exactly what an uninterrupted
run draws there.
"""

from __future__ import annotations


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """``(seed * 1_000_003 + step * 7919 + salt) mod (2^63 - 1)``, a valid ``torch`` / ``random`` seed.

    The formula is fixed: a checkpoint written by one version resumes bitwise in the next only if the
    seeds of the remaining steps are unchanged (tests/unit/test_seeds.py locks the values)."""
    return (seed * 1_000_003 + step * 7919 + salt) % (2**63 - 1)
