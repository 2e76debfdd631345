"""Time limits for tests, sized for a busy machine (issue 22).

Each limit is a safety net that stops a hung test, never the thing that decides whether a correct
run passes: it is well over 10x what the test needs on a quiet 2-core machine, because a machine
shared with other jobs can be that much slower (docs/testing.md). The Makefile's ``--timeout=300``
covers unit tests; tests/conftest.py gives every engine and e2e test ``E2E_TIMEOUT_S`` unless it
carries its own ``pytest.mark.timeout(...)``.
"""

CHILD_TIMEOUT_S = 1800.0
"""Most seconds a test waits for one child process (a ``tether train`` of the resume test: about 9 s
at load 5-9)."""

E2E_TIMEOUT_S = 1800
"""pytest-timeout for an engine test or a tiny end-to-end run (at most 11 s each at load 5-9)."""

HEAVY_TIMEOUT_S = 3600
"""pytest-timeout for the heaviest tests: the default job (test_rl_improves, 195 s at load 5-9) and
the resume test (five ``tether train`` children, 44 s at load 5-9)."""
