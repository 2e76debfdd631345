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


@functools.cache
def ray_python() -> str | None:
    """An interpreter with ``ray`` and ``safetensors`` importable: this one, else the repository's .venv-ray."""
    for py in (sys.executable, str(ROOT / ".venv-ray" / "bin" / "python")):
        if Path(py).exists() and run([py, "-c", "import ray, safetensors"], timeout=120).returncode == 0:
            return py
    return None


def run_isolated(args: Sequence[str], *, timeout: float, env: Mapping[str, str] | None = None
                 ) -> subprocess.CompletedProcess:
    """``args`` inside fresh network + PID namespaces with only loopback up (module docstring)."""
    return run([*PREFIX, *args], timeout=timeout, env=env)
