"""Choosing the malloc the ``tether`` command re-executes itself with (tether/allocator.py)."""

import os
import sys

import pytest

from tests.processes import run
from tether.allocator import ENV, choose_malloc, find_malloc

pytestmark = pytest.mark.unit


@pytest.fixture
def libdir(tmp_path):
    (tmp_path / "libjemalloc.so.2").write_bytes(b"")
    (tmp_path / "libtcmalloc_minimal.so.4").write_bytes(b"")
    return [str(tmp_path)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux only")
def test_auto_is_tcmalloc_jemalloc_only_when_asked(tmp_path, libdir):
    assert choose_malloc({}, libdir).endswith("libtcmalloc_minimal.so.4")
    assert choose_malloc({ENV: "auto"}, libdir).endswith("libtcmalloc_minimal.so.4")
    assert choose_malloc({ENV: "jemalloc"}, libdir).endswith("libjemalloc.so.2")
    (tmp_path / "libtcmalloc_minimal.so.4").unlink()
    assert choose_malloc({}, libdir) is None  # auto never picks jemalloc (more faults on a step)
    assert choose_malloc({ENV: "JEMALLOC "}, libdir).endswith("libjemalloc.so.2")
    (tmp_path / "libjemalloc.so.2").unlink()
    assert choose_malloc({ENV: "jemalloc"}, libdir) is None  # asked for but missing: system malloc


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux only")
def test_opt_out_loop_guard_and_existing_preload(libdir, capsys):
    assert choose_malloc({ENV: "system"}, libdir) is None
    assert choose_malloc({"TETHER_MALLOC_REEXEC": "x"}, libdir) is None  # the re-executed child
    assert choose_malloc({"LD_PRELOAD": "/opt/libtcmalloc.so"}, libdir) is None
    assert choose_malloc({ENV: "jemalloc"}, ["/nonexistent"]) is None
    assert "not installed" in capsys.readouterr().err
    assert choose_malloc({ENV: "mimalloc"}, libdir) is None
    assert "not one of" in capsys.readouterr().err


@pytest.mark.skipif(find_malloc("tcmalloc") is None, reason="tcmalloc not installed")
def test_command_reexecs_with_the_preload_and_still_works():
    code = ("import os, sys; from tether.cli import main; sys.argv = ['tether', 'objectives']; "
            "main(); print('PRELOAD=' + os.environ.get('LD_PRELOAD', ''))")
    out = run([sys.executable, "-c", code], env={**os.environ, ENV: "auto"})
    assert out.returncode == 0, out.stderr
    # the re-executed `python -m tether objectives` printed the presets; the -c tail never ran (exec)
    assert "PRELOAD=" not in out.stdout and "grpo" in out.stdout
    off = run([sys.executable, "-c", code], env={**os.environ, ENV: "system", "LD_PRELOAD": ""})
    assert off.returncode == 0 and "PRELOAD=\n" in off.stdout + "\n"
