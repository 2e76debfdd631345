import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def shared_warmstart_cache(tmp_path_factory):
    """One warm-start cache for the whole session (subprocesses inherit it through the environment)."""
    old = os.environ.get("TETHER_CACHE")
    path = tmp_path_factory.mktemp("tether-cache")
    os.environ["TETHER_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("TETHER_CACHE", None)
    else:
        os.environ["TETHER_CACHE"] = old
