"""The isolation harness itself (issue 16, item 7): only loopback inside, nothing left running after."""

import time
from pathlib import Path

import pytest

from tests.dist.netns import isolation_skip_reason, run_isolated


@pytest.fixture(autouse=True)
def _namespaces():
    reason = isolation_skip_reason()
    if reason:
        pytest.skip(reason)


def test_only_loopback_is_up_and_nothing_outside_is_reachable():
    done = run_isolated(["sh", "-c", "ip -o link show; echo ---; ip -4 route show; echo ---; ip -o addr show"],
                        timeout=30)
    assert done.returncode == 0, done.stderr
    links, routes, addrs = done.stdout.split("---\n")
    assert [line.split(":")[1].strip() for line in links.splitlines()] == ["lo"]  # no other interface at all
    assert "default" not in routes  # no route out
    assert "inet 127.0.0.1/8" in addrs


def _sleepers(tag: str) -> list[int]:
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if tag in (p / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                    found.append(int(p.name))
            except OSError:
                pass
    return found


def test_a_daemonised_grandchild_dies_with_the_child():
    tag = "77.25"  # a detached process in its own session, as Ray's raylet and GCS are
    done = run_isolated(["sh", "-c", f"setsid sleep {tag} </dev/null >/dev/null 2>&1 & sleep 0.2; exit 0"], timeout=30)
    assert done.returncode == 0, done.stderr
    for _ in range(50):
        if not _sleepers(tag):
            break
        time.sleep(0.1)
    assert _sleepers(tag) == []
