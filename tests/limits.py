"""Time limits for tests, sized for a busy machine (issue 22).

Each limit is a safety net that stops a hung test, never the thing that decides whether a correct
run passes: it is well over 10x what the test needs on a quiet 2-core machine, because a machine
shared with other jobs can be that much slower (docs/testing.md). The Makefile's ``--timeout=300``
covers unit tests; tests/conftest.py gives every engine and e2e test ``E2E_TIMEOUT_S`` unless it
carries its own ``pytest.mark.timeout(...)``.
"""

CHILD_TIMEOUT_S = 1800.0
"""Most seconds a test waits for one child process (``tether train`` for 8 tiny steps takes about 15 s)."""

E2E_TIMEOUT_S = 1800
"""pytest-timeout for an engine test or a tiny end-to-end run (seconds to a minute on a quiet machine)."""

HEAVY_TIMEOUT_S = 3600
"""pytest-timeout for the heaviest tests: the default job (test_rl_improves) and the resume test
(five ``tether train`` children), a few minutes each on a quiet 2-core machine."""
