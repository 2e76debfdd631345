from tests.e2e.conftest import shared_warmstart_cache  # noqa: F401  (one warm-start cache, never ~/.cache)
