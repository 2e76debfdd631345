"""Run a documented code block as written: the few textual replacements a test needs (a local model for a hub
name, CPU settings) must each match the block, so the doc cannot drift from what the test runs."""

from __future__ import annotations

from pathlib import Path


def exec_block(code: str, doc: Path, cwd: Path, monkeypatch, replace: dict[str, str]) -> dict:
    """Exec ``code`` (a block of ``doc``) in ``cwd`` after ``replace`` (old -> new, each present); its globals."""
    for old, new in replace.items():
        assert old in code, f"{doc.name}: the documented block no longer contains {old!r}"
        code = code.replace(old, new)
    monkeypatch.chdir(cwd)
    scope: dict = {}
    exec(compile(code, str(doc), "exec"), scope)
    return scope
