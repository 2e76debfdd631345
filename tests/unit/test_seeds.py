"""The per-step seed depends on the step, the run's seed and the salt (issue 22); the trainer-level
check (consecutive steps draw different prompts and rollouts) is tests/e2e/test_step_seeds.py."""

import pytest
import torch

from tether.train.seeds import step_seed

pytestmark = pytest.mark.unit


def test_every_term_changes_the_seed():
    seeds = {step_seed(seed, step, salt) for seed in range(4) for step in range(200) for salt in range(4)}
    assert len(seeds) == 4 * 200 * 4  # no two (seed, step, salt) share a generator
    assert step_seed(0, 0) != step_seed(0, 1) != step_seed(0, 2)
    assert step_seed(0, 5) != step_seed(1, 5)
    assert step_seed(0, 5, 0) != step_seed(0, 5, 1)
    assert all(0 <= s < 2**63 - 1 for s in seeds)
    torch.Generator().manual_seed(step_seed(2**62, 10**9, 10**6))  # huge inputs stay a valid torch seed


def test_values_are_locked():
    """Regression lock, do not "fix": a checkpoint resumes bitwise only if the remaining steps draw the
    seeds the interrupted run would have drawn, also across tether versions."""
    assert step_seed(0, 0) == 0
    assert step_seed(3, 5, 1) == 3 * 1_000_003 + 5 * 7919 + 1 == 3_039_605
    assert step_seed(2**62, 1) == (2**62 * 1_000_003 + 7919) % (2**63 - 1)
