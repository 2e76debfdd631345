"""Atomic checkpoints: write into a temporary folder, then rename it into place.

A run killed at any moment leaves either the previous checkpoint or the new one, never a torn one.
Layout: ``RUN/checkpoints/step_000010/state.pt`` and ``RUN/checkpoints/latest`` (a text file with the
folder name, itself replaced atomically).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    with open(tmp / "state.pt", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = root / f".latest-{os.getpid()}"
    latest_tmp.write_text(name)
    os.replace(latest_tmp, root / "latest")
    _fsync_dir(root)
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest_checkpoint(run_dir: str | Path) -> dict[str, Any] | None:
    root = Path(run_dir) / "checkpoints"
    latest = root / "latest"
    if not latest.exists():
        return None
    path = root / latest.read_text().strip() / "state.pt"
    if not path.exists():
        raise FileNotFoundError(f"checkpoint named by {latest} is missing: {path}")
    return torch.load(path, map_location="cpu", weights_only=False)
