"""Settings for the whole test session; this file is read before any test module imports torch."""

import os

import pytest

# libgomp's default lets an OpenMP thread spin while it waits for work. With `--threads 2` on a machine
# whose cores are busy, the two spinning threads fight the load and each other: 40 forward passes of
# the tiny model took 50-109 s instead of 3.2-3.6 s with passive waiting (load 13, docs/testing.md).
# How idle threads wait changes no result, only the time. Read when torch loads libgomp, so it must be
# set here, before the first `import torch`; child processes inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _session_cache_dir(tmp_path_factory):
    """The session's ``TETHER_CACHE``: under xdist, the folder above the workers' own temp folders, so the two
    workers share it (a warm start of the tiny model costs seconds of CPU and most keys recur across files;
    the cache writes each entry atomically, so two workers missing the same key both write a whole file)."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path = root / "tether-cache"
    path.mkdir(exist_ok=True)
    return path


def pytest_collection_modifyitems(items):
    """Every engine and e2e test gets the busy-machine limit unless it sets its own; the Makefile's
    `--timeout=300` stays for unit tests (tests/limits.py)."""
    from tests.limits import E2E_TIMEOUT_S

    for item in items:
        layered = item.get_closest_marker("e2e") or item.get_closest_marker("engine")
        if layered and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(E2E_TIMEOUT_S))


@pytest.fixture(scope="session", autouse=True)
def shared_warmstart_cache(tmp_path_factory):
    """One warm-start and model cache for the whole session, never the user's ``~/.cache`` (a fresh CI
    machine and a developer's warm home cache then time the same); subprocesses inherit it through the
    environment."""
    old = os.environ.get("TETHER_CACHE")
    path = _session_cache_dir(tmp_path_factory)
    os.environ["TETHER_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("TETHER_CACHE", None)
    else:
        os.environ["TETHER_CACHE"] = old
