"""Run the ``tether`` command under a faster ``malloc`` when one is installed.

glibc's malloc returns large freed blocks to the OS and page-faults them back on the next
allocation; a training step allocates and frees the same activation buffers every step, so on CPU
it pays those faults every step (see docs/benchmarks.md, "Training step"). jemalloc and tcmalloc keep
the pages. A library can only replace malloc if it is loaded before anything else, so the ``tether``
entry point re-executes itself once with ``LD_PRELOAD`` naming it.

Control with the environment variable ``TETHER_MALLOC``:

- unset or ``auto``: tcmalloc if installed, else the system malloc (silently). Not jemalloc: on the
  tiny model's training step it page-faulted ~40 000 times per step (glibc ~650, tcmalloc ~320)
  and used 12 % more CPU than glibc (``benchmarks/allocator.py``, docs/benchmarks.md);
- ``jemalloc`` / ``tcmalloc``: that one (a warning and the system malloc if it is not installed);
- ``system``: never re-execute.

Nothing happens when ``LD_PRELOAD`` already names a malloc, on non-Linux systems, or when called as a
library (only :func:`tether.cli.main` calls :func:`reexec_with_fast_malloc`).
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Sequence

ENV = "TETHER_MALLOC"
_MARK = "TETHER_MALLOC_REEXEC"  # set in the re-executed child so it never loops
_SONAMES = {"jemalloc": ("libjemalloc.so.2", "libjemalloc.so"),
            "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so")}
_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib",
         "/lib/x86_64-linux-gnu", "/lib64")


def find_malloc(name: str, dirs: Sequence[str] = _DIRS) -> str | None:
    """Path of the shared library of ``name`` (``jemalloc`` or ``tcmalloc``), or None if not installed."""
    for d in dirs:
        for soname in _SONAMES[name]:
            hits = sorted(glob.glob(os.path.join(d, soname)))
            if hits:
                return hits[0]
    return None


def choose_malloc(env: dict[str, str], dirs: Sequence[str] = _DIRS) -> str | None:
    """The library to preload for this environment, or None to keep the running malloc."""
    if env.get(_MARK) or not sys.platform.startswith("linux"):
        return None
    if any(k in env.get("LD_PRELOAD", "") for k in ("jemalloc", "tcmalloc")):
        return None
    wanted = env.get(ENV, "auto").strip().lower() or "auto"
    if wanted == "system":
        return None
    if wanted == "auto":
        return find_malloc("tcmalloc", dirs)
    if wanted not in _SONAMES:
        print(f"tether: {ENV}={wanted!r} is not one of auto, jemalloc, tcmalloc, system; using the system malloc",
              file=sys.stderr)
        return None
    path = find_malloc(wanted, dirs)
    if path is None:
        print(f"tether: {ENV}={wanted} but lib{wanted} is not installed; using the system malloc", file=sys.stderr)
    return path


def reexec_with_fast_malloc(argv: Sequence[str]) -> None:
    """Replace this process by ``python -m tether *argv`` with the chosen malloc preloaded (returns
    without doing anything when :func:`choose_malloc` says so or the exec fails)."""
    lib = choose_malloc(dict(os.environ))
    if lib is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = f"{lib} {env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else lib
    env[_MARK] = lib
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", "tether", *argv], env)
    except OSError:  # exec refused (sandbox, missing interpreter path): carry on with this malloc
        return
