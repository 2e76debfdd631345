"""Importing verl for the parity tests: skip without it, except where the test target installed it.

``make test`` and ``make test-verl`` install verl's loss code (scripts/setup_verl.sh) and set
``TETHER_REQUIRE_VERL=1``; there a verl that does not import is an error, so the parity tests cannot
silently skip in CI. A plain ``pytest`` without verl skips them.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

REQUIRE = "TETHER_REQUIRE_VERL"


def import_verl(module: str) -> ModuleType:
    """``import module``; if that fails, skip the calling test module, or raise under ``TETHER_REQUIRE_VERL=1``."""
    try:
        return importlib.import_module(module)
    except ImportError as missing:
        if os.environ.get(REQUIRE) == "1":
            raise ImportError(f"{REQUIRE}=1 but {module} is not importable ({missing}); run bash scripts/setup_verl.sh "
                              "and put .venv-verl on PYTHONPATH after the repository") from missing
        pytest.skip(f"{module} not importable (scripts/setup_verl.sh)", allow_module_level=True)
