"""Time limits for tests, sized for a busy machine (issue 22).

Each limit is a safety net that stops a hung test, never the thing that decides whether a correct
run passes: it is at least 10x what the test needs on a quiet 2-core machine (measured with
``pytest --durations=0``; docs/testing.md), because a machine shared with other jobs can be that much
slower. The Makefile's ``--timeout=300`` covers every other test; a test that needs more on a quiet
machine than 30 s carries ``pytest.mark.timeout(...)`` with one of these.
"""

CHILD_TIMEOUT_S = 1800.0
"""Most seconds a test waits for one child process (``tether train`` for 8 tiny steps takes about 15 s)."""

E2E_TIMEOUT_S = 1800
"""pytest-timeout for a tiny end-to-end run (each takes 5-60 s on a quiet 2-core machine)."""

HEAVY_TIMEOUT_S = 3600
"""pytest-timeout for the heaviest tests: the default job (test_rl_improves) and the resume test
(five ``tether train`` children), about 1-2 min each on a quiet 2-core machine."""
