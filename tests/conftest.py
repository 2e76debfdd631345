"""Settings for the whole test session; this file is read before any test module imports torch."""

import os

# libgomp's default lets an OpenMP thread spin while it waits for work. With `--threads 2` on a machine
# whose cores are busy, the two spinning threads fight the load and each other: 40 forward passes of
# the tiny model took 50-109 s instead of 3.2-3.6 s with passive waiting (load 13, docs/testing.md).
# How idle threads wait changes no result, only the time. Read when torch loads libgomp, so it must be
# set here, before the first `import torch`; child processes inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def pytest_collection_modifyitems(items):
    """Every engine and e2e test gets the busy-machine limit unless it sets its own; the Makefile's
    `--timeout=300` stays for unit tests (tests/limits.py)."""
    import pytest

    from tests.limits import E2E_TIMEOUT_S

    for item in items:
        layered = item.get_closest_marker("e2e") or item.get_closest_marker("engine")
        if layered and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(E2E_TIMEOUT_S))
