"""Run a test's cluster in its own network and PID namespaces (issue 16, item 7).

``run_isolated(args)`` runs ``args`` as

    unshare -rn --pid --fork --kill-child --mount-proc sh -c 'ip link set lo up && exec "$@"'

through ``tests.processes.run``: the child sees only a loopback interface (Ray binds to 127.0.0.1 and can reach
nothing else), runs as root of a user namespace (no real privileges), and is PID 1 of its own PID namespace,
so when it exits or is killed (timeout) the kernel kills every process it started: Ray's GCS, raylet and
workers included, whatever sessions they made. ``isolation_skip_reason()`` says why a machine cannot do this
(no ``unshare``, user namespaces disabled, no ``ip``), and the tests skip with that reason.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.processes import ROOT, run

PREFIX = ["unshare", "-rn", "--pid", "--fork", "--kill-child", "--mount-proc",
          "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]


@functools.cache
def isolation_skip_reason() -> str | None:
    """None when namespaces work here; else why not (the skip reason)."""
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return f"network namespace isolation needs '{tool}' (util-linux / iproute2), not found"
    probe = run([*PREFIX, "ip", "-o", "link", "show", "up"], timeout=30)
    if probe.returncode != 0:
        return f"cannot create a network namespace here (unshare -rn): {probe.stderr.strip()[:200]}"
    ups = [line.split(":")[1].strip() for line in probe.stdout.splitlines() if line.strip()]
    if ups != ["lo"]:
        return f"the namespace has other interfaces up: {ups}"
    return None


RAY_PKGS = ROOT / ".ray-pkgs"
"""``pip install --target .ray-pkgs ray`` into the repository: added to the children's PYTHONPATH when present."""


def ray_pythonpath() -> str:
    """The PYTHONPATH of a child that runs Ray: this checkout, and .ray-pkgs when it exists."""
    return os.pathsep.join([str(ROOT)] + ([str(RAY_PKGS)] if RAY_PKGS.is_dir() else []))


@functools.cache
def ray_python() -> str | None:
    """An interpreter with ``ray`` and ``safetensors`` importable (with :func:`ray_pythonpath`): this one, else the
    repository's .venv-ray."""
    env = {**os.environ, "PYTHONPATH": ray_pythonpath()}
    for py in (sys.executable, str(ROOT / ".venv-ray" / "bin" / "python")):
        if Path(py).exists() and run([py, "-c", "import ray, safetensors"], timeout=120, env=env).returncode == 0:
            return py
    return None


def run_isolated(args: Sequence[str], *, timeout: float, env: Mapping[str, str] | None = None
                 ) -> subprocess.CompletedProcess:
    """``args`` inside fresh network + PID namespaces with only loopback up (module docstring)."""
    return run([*PREFIX, *args], timeout=timeout, env=env)


def ray_scenario(module: str, out: Path) -> dict:
    """``python -m module OUT`` with Ray, isolated (:func:`run_isolated`); its ``SCENARIO {json}`` line, parsed.
    Skips (pytest) with the reason when namespaces or Ray are unavailable; fails with the child's output."""
    import json

    import pytest

    from tests.processes import tether_env

    reason = isolation_skip_reason()
    if reason:
        pytest.skip(reason)
    py = ray_python()
    if py is None:
        pytest.skip("ray is not installed (pip install -e '.[dist]', or a .venv-ray / .ray-pkgs in the repository)")
    done = run_isolated([py, "-m", module, str(out)], timeout=600,
                        env=tether_env(RAY_USAGE_STATS_ENABLED="0", OMP_WAIT_POLICY="PASSIVE",
                                       PYTHONPATH=ray_pythonpath()))
    lines = [line for line in done.stdout.splitlines() if line.startswith("SCENARIO ")]
    assert done.returncode == 0 and lines, (f"{module} failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                                            f"{done.stderr[-5000:]}")
    return json.loads(lines[-1].removeprefix("SCENARIO "))
