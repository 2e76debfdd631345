"""Checkpoints that survive kills, full disks, torn files and hostile files.

Layout of ``RUN/checkpoints/``::

    step_000010/state.pt        the payload: tensors and plain data only (torch.save)
    step_000010/manifest.json   {"format": 1, "step": 10, "run_id": ..., "files": {"state.pt": {"bytes", "sha256"}}}
    latest                      the newest folder's name (a text file, itself replaced atomically)

Writing goes into ``.tmp-step_000010-PID``, is fsynced, then renamed into place, and ``latest`` is
replaced the same way (``.latest-PID``), so a run killed at any moment leaves the previous checkpoint
or the new one, never a torn one. A failed write removes its temporary files; a full disk says so,
naming the step, the folder and the intact previous checkpoint. Pruning (``keep``) only ever removes
checkpoints whose manifest names the writing run's ``run_id``.

Loading never executes code from the file: the payload is checked against its manifest's sha256,
then read with ``torch.load(weights_only=True)``, which builds only tensors and plain containers
(dict, list, tuple, str, numbers, None) and refuses anything else. A damaged or refused ``latest``
falls back to the newest intact checkpoint with a warning naming both; a missing ``latest`` is
reconstructed from the step folders.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

STATE = "state.pt"
MANIFEST = "manifest.json"
FORMAT = 1
_STEP_DIR = re.compile(r"step_(\d{6,})")
_TEMPORARY = (".tmp-step_*", ".latest-*")
_PLAIN = (str, int, float, bool, type(None))


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or loaded; the message says which, why, and what is intact."""


class DamagedCheckpoint(Exception):
    """One checkpoint folder failed its checks (the message says which check)."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    run_id: str | None  # None: written before manifests existed
    state: dict[str, Any]


def step_name(step: int) -> str:
    return f"step_{step:06d}"


# ----------------------------------------------------------------------------------------- writing


def check_plain(value: Any, where: str = "state") -> None:
    """Raise ``TypeError`` naming the key path of anything ``torch.load(weights_only=True)`` would refuse."""
    if isinstance(value, torch.Tensor) or isinstance(value, _PLAIN):
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint key {where}[{k!r}]: keys must be str or int, got {type(k).__name__}")
            check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"checkpoint value {where}: {type(value).__name__} is not plain data (tensors, dict, list, "
                    "tuple, str, int, float, bool, None); it could not be loaded without executing code")


class _HashingWriter:
    """A write-only file wrapper that hashes what passes through (one pass over the bytes)."""

    def __init__(self, f) -> None:
        self.f, self.sha256, self.bytes = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _write_durably(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    with open(path, "xb") as f:
        w = _HashingWriter(f)
        torch.save(state, w)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": w.bytes, "sha256": w.sha256.hexdigest()}


def _write_text_durably(path: Path, text: str) -> None:
    with open(path, "xb") as f:
        f.write(text.encode())
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_full_message(step: int, root: Path, previous: str | None) -> str:
    intact = (f"the previous checkpoint step {int(previous.split('_')[1])} is intact" if previous
              else "there is no earlier checkpoint")
    return (f"no space left on device while writing checkpoint step {step} to {root}; {intact}. "
            "Free some space, then resume the run")


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], *, run_id: str, keep: int = 2) -> Path:
    """Write ``state`` as checkpoint ``step`` of run ``run_id`` atomically; keep that run's newest ``keep``."""
    check_plain(state)
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = step_name(step)
    final, tmp, latest_tmp = root / name, root / f".tmp-{name}-{os.getpid()}", root / f".latest-{os.getpid()}"
    previous = read_latest_name(root)
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        entry = _write_durably(tmp / STATE, state)
        manifest = {"format": FORMAT, "step": step, "run_id": run_id, "files": {STATE: entry}}
        _write_text_durably(tmp / MANIFEST, json.dumps(manifest, indent=1))
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp.unlink(missing_ok=True)
        _write_text_durably(latest_tmp, name)
        os.replace(latest_tmp, root / "latest")
        _fsync_dir(root)
    except BaseException as e:  # a kill (signal), a full disk, anything: leave no temporaries behind
        shutil.rmtree(tmp, ignore_errors=True)
        latest_tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(_disk_full_message(step, root, previous)) from e
        raise
    prune(root, run_id, keep, current=name)
    return final


def prune(root: Path, run_id: str, keep: int, *, current: str) -> None:
    """Remove all but the newest ``keep`` checkpoints whose manifest names ``run_id`` (never ``current``)."""
    ours = []
    for folder in root.glob("step_*"):
        manifest = _read_manifest(folder)
        if manifest is not None and manifest.get("run_id") == run_id:
            ours.append((manifest["step"], folder))
    for _, folder in sorted(ours)[:-keep]:
        if folder.name != current:
            shutil.rmtree(folder, ignore_errors=True)


def clean_temporaries(run_dir: str | Path) -> list[Path]:
    """Remove the temporary files a killed or failed write left in ``RUN/checkpoints``; returns them.
    Call only while holding the run directory (no other process may be writing there)."""
    root = Path(run_dir) / "checkpoints"
    found = [p for pattern in _TEMPORARY for p in root.glob(pattern)] if root.is_dir() else []
    for p in found:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return found


# ----------------------------------------------------------------------------------------- loading


def read_latest_name(root: Path) -> str | None:
    """The folder ``root/latest`` names, or None when it is missing or is not a step folder name."""
    try:
        name = (root / "latest").read_text(errors="replace").strip()
    except OSError:
        return None
    return name if _STEP_DIR.fullmatch(name) else None


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest if it is well formed, else None."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        entry = manifest["files"][STATE]
        ok = (manifest["format"] == FORMAT and isinstance(manifest["step"], int)
              and isinstance(entry["bytes"], int) and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest if ok else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _verify(folder: Path) -> dict[str, Any] | None:
    """Check ``folder`` against its manifest; returns the manifest (None for a folder from before
    manifests). Raises ``DamagedCheckpoint`` naming the failed check."""
    path = folder / STATE
    if not path.is_file():
        raise DamagedCheckpoint(f"{STATE} is missing")
    if not (folder / MANIFEST).exists():
        log.warning("checkpoint %s has no %s (written by an older tether): loaded without an integrity check",
                    folder, MANIFEST)
        return None
    manifest = _read_manifest(folder)
    if manifest is None:
        raise DamagedCheckpoint(f"{MANIFEST} is not a valid checkpoint manifest")
    if step_name(manifest["step"]) != folder.name:
        raise DamagedCheckpoint(f"{MANIFEST} is for step {manifest['step']}, not for this folder")
    entry = manifest["files"][STATE]
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise DamagedCheckpoint(f"{STATE} has {size} bytes, its manifest says {entry['bytes']} (truncated or replaced)")
    if _sha256(path) != entry["sha256"]:
        raise DamagedCheckpoint(f"{STATE} does not match the sha256 in its manifest (corrupted or changed)")
    return manifest


def _load_state(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            first = str(e).strip().splitlines()[-1][:300]
            raise DamagedCheckpoint(f"{STATE} refused: loading it would execute code (tether loads only tensors and "
                                    f"plain data): {first}") from None
        raise DamagedCheckpoint(f"{STATE} cannot be read: {e}") from None
    except Exception as e:  # a torn or garbled file: torch raises RuntimeError, EOFError, ...
        raise DamagedCheckpoint(f"{STATE} cannot be read: {type(e).__name__}: {str(e)[:300]}") from None
    if not isinstance(state, dict):
        raise DamagedCheckpoint(f"{STATE} holds a {type(state).__name__}, not a checkpoint dict")
    return state


def load_checkpoint_dir(folder: Path) -> Checkpoint:
    """Verify and load one checkpoint folder (``DamagedCheckpoint`` if it fails a check)."""
    manifest = _verify(folder)
    state = _load_state(folder / STATE)
    step = manifest["step"] if manifest else int(_STEP_DIR.fullmatch(folder.name).group(1))
    return Checkpoint(folder, step, manifest["run_id"] if manifest else None, state)


def _step_folders(root: Path) -> list[Path]:
    """Step folders, newest step first."""
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def load_latest(run_dir: str | Path) -> Checkpoint | None:
    """The checkpoint ``latest`` names if it is intact, else the newest intact one (with a warning naming
    both); None when the run has no checkpoint at all. ``CheckpointError`` when none is intact."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    named, folders = read_latest_name(root), _step_folders(root)
    if not folders:
        if (root / "latest").exists():
            raise CheckpointError(f"{root / 'latest'} names a checkpoint, but {root} holds no step folder")
        return None
    order = [root / named] if named else []
    order += [f for f in folders if f.name != named]
    failures = []
    for folder in order:
        try:
            ckpt = load_checkpoint_dir(folder)
        except (DamagedCheckpoint, OSError) as e:
            failures.append(f"{folder.name}: {e}")
            continue
        if named is None:
            log.warning("%s is missing or unreadable; reconstructed it from the step folders: resuming from %s%s",
                        root / "latest", folder.name, "".join(f" ({f} skipped)" for f in failures))
        elif failures:
            log.warning("checkpoint %s is damaged (%s); falling back to %s, the newest intact checkpoint",
                        named, "; ".join(failures), folder.name)
        return ckpt
    raise CheckpointError(f"no intact checkpoint in {root}: " + "; ".join(failures))


def load_latest_checkpoint(run_dir: str | Path) -> dict[str, Any] | None:
    """The payload of :func:`load_latest` (None when the run has no checkpoint)."""
    ckpt = load_latest(run_dir)
    return None if ckpt is None else ckpt.state
