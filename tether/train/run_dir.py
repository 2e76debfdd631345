"""The run directory: one process at a time, never a silent overwrite, resumable from the first second.

``open_run_dir(cfg, default)`` is the one call a training loop makes at start-up, before it builds
anything. It

1. locks the directory (``RUN/run.lock`` holds the PID; a second process is refused with the
   holder's PID; the lock is a kernel ``flock``, so a lock left by a killed process is free and is
   taken over atomically, with a warning naming the dead PID);
2. refuses a fresh run into a directory that already holds files, unless ``overwrite`` is set (then
   the previous run's checkpoints, metrics and summary are deleted, and said so); on ``resume`` it
   checks ``metrics.jsonl`` (a torn last line is dropped with a warning, any other bad line is an
   error naming file and line) and prints the reward module it is about to import;
3. removes the temporary files a killed write left behind;
4. writes ``config.json`` first, so a run killed during start-up can be resumed;

and yields a ``RunDir`` whose ``load_checkpoint`` / ``save_checkpoint`` the loop uses. The lock is
released when the ``with`` block ends, however it ends.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tether.configs import to_dict
from tether.train.checkpoint import CheckpointError, clean_temporaries, load_latest, save_checkpoint
from tether.train.config import TrainConfig
from tether.train.metrics_log import check_metrics_file

log = logging.getLogger(__name__)

LOCK = "run.lock"
RUN_FILES = ("checkpoints", "metrics.jsonl", "summary.json", "reward.png", "mismatch.png", "tensorboard", "wandb",
             "mlruns")
"""What a run writes besides config.json; ``overwrite`` deletes these (and nothing else)."""
_LEFTOVERS = ("metrics.tmp", ".config.json.tmp")


class RunDirError(ValueError):
    """The run directory cannot be used as asked; the message says why and what to do."""


class RunLock:
    """An exclusive ``flock`` on ``RUN/run.lock``, whose content names the holder (PID, host, start)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory locks; run unlocked
            log.warning("%s: this platform has no fcntl; the run directory is not locked", self.path)
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, 4096, 0))
            os.close(fd)
            raise RunDirError(f"{self.path.parent} is in use by another tether run ({holder}); wait for it to "
                              "finish or stop it, or choose another --out") from None
        except OSError as e:  # e.g. a filesystem without locks
            os.close(fd)
            log.warning("%s: cannot lock (%s); the run directory is not locked", self.path, e)
            return
        stale = os.pread(fd, 4096, 0)
        if stale.strip():  # the holder died without releasing: the kernel dropped its lock
            log.warning("%s: taking over the lock of a process that is no longer running (%s)", self.path,
                        _describe(stale))
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        import fcntl

        os.ftruncate(self.fd, 0)  # an empty lock file: nobody holds it
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def _describe(content: bytes) -> str:
    try:
        h = json.loads(content)
        return f"PID {h['pid']} on {h['host']}, started {h['started']}"
    except (ValueError, KeyError, TypeError):
        return "PID unknown: the lock file is being written"


def reward_notice(cfg: TrainConfig) -> str | None:
    """What a resume will import: the reward's module file, when the reward is user code."""
    user = [spec for spec, _ in cfg.rewards if ":" in spec]
    if not user:
        return None  # built-in rewards
    return "\n".join(_reward_notice(cfg, spec) for spec in user)


def _reward_notice(cfg: TrainConfig, spec: str) -> str:
    module = spec.rpartition(":")[0]
    if module.endswith(".py"):
        where = str(Path(module).resolve())
    else:
        top = module.split(".")[0]
        try:
            found = importlib.util.find_spec(top)  # a top-level name: found without importing anything
        except (ImportError, ValueError):
            found = None
        origin = found and (found.origin or next(iter(found.submodule_search_locations or []), None))
        where = f"module {module} ({origin})" if origin else f"module {module} (not found on sys.path yet)"
    return (f"tether: resuming {cfg.resume}: its config names the reward {spec!r}; importing {where}, "
            "which runs that code")


@dataclass
class RunDir:
    """A locked run directory: where the loop reads and writes checkpoints."""

    path: Path
    cfg: TrainConfig
    last_logged_step: int | None = None
    saved_checkpoint_every: int | None = None  # the run's checkpoint_every as it was written (its config.json)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    keep: int = 2

    def load_checkpoint(self) -> dict[str, Any] | None:
        """On resume: the newest intact checkpoint's payload (None: none written yet). A fresh run: None."""
        if not self.cfg.resume:
            return None
        ckpt = load_latest(self.path)
        if ckpt is None:
            every = self.saved_checkpoint_every or self.cfg.checkpoint_every
            if self.last_logged_step is not None and self.last_logged_step >= every:
                raise CheckpointError(
                    f"--resume {self.path}: metrics.jsonl records steps up to {self.last_logged_step}, but there is "
                    f"no checkpoint in {self.path / 'checkpoints'}; refusing to restart from step 0 over that "
                    "history (--out with --overwrite starts the run again)")
            return None
        if ckpt.run_id is not None:
            self.run_id = ckpt.run_id  # pruning keeps touching this run's checkpoints only
        return ckpt.state

    def save_checkpoint(self, step: int, state: dict[str, Any]) -> Path:
        return save_checkpoint(self.path, step, state, run_id=self.run_id, keep=self.keep)


def _prepare_fresh(path: Path, overwrite: bool) -> None:
    # a directory holding only a config.json is a run that stopped during start-up (a refused preset, a kill
    # before its first step): nothing of it is lost by starting again there
    held = sorted(p.name for p in path.iterdir() if p.name not in (LOCK, "config.json"))
    if not held:
        return
    if not overwrite:
        shown = ", ".join(held[:6]) + (", ..." if len(held) > 6 else "")
        raise RunDirError(f"run directory {path} is not empty ({shown}); continue that run with --resume {path}, "
                          "or start over with --overwrite (deletes its checkpoints and metrics)")
    removed = [name for name in RUN_FILES if (path / name).exists()]
    for name in removed:
        target = path / name
        shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
    if removed:
        print(f"tether: --overwrite: deleted the previous run's {', '.join(removed)} in {path}", file=sys.stderr)


def _remove_leftovers(path: Path) -> None:
    """Temporary files of writes a killed run never finished (we hold the lock: nobody else writes)."""
    removed = clean_temporaries(path)
    for name in _LEFTOVERS:
        if (path / name).is_file():
            (path / name).unlink()
            removed.append(path / name)
    for p in removed:
        log.warning("removed %s, left by a write that was interrupted", p)


def _saved_checkpoint_every(path: Path) -> int | None:
    """``checkpoint_every`` of the config the run was written with (before this start rewrites it)."""
    try:
        value = json.loads((path / "config.json").read_text()).get("checkpoint_every")
    except (OSError, ValueError, AttributeError):
        return None
    return value if type(value) is int and value >= 1 else None


def _write_config(path: Path, cfg: TrainConfig) -> None:
    tmp = path / ".config.json.tmp"
    tmp.write_text(json.dumps({**to_dict(cfg), "overwrite": False}, indent=2))  # a resume never overwrites
    os.replace(tmp, path / "config.json")


@contextmanager
def open_run_dir(cfg: TrainConfig, default: str | Path) -> Iterator[RunDir]:
    """Lock, validate, clean and initialise the run directory (``cfg.resume``, else ``cfg.out``, else
    ``default``); yields the ``RunDir``; releases the lock on exit."""
    path = Path(cfg.resume or cfg.out or default)
    if cfg.resume and not path.is_dir():
        raise RunDirError(f"--resume {path}: no such run directory")
    path.mkdir(parents=True, exist_ok=True)
    lock = RunLock(path)
    lock.acquire()
    try:
        run = RunDir(path, cfg)
        if cfg.resume:
            run.last_logged_step = check_metrics_file(path / "metrics.jsonl")
            run.saved_checkpoint_every = _saved_checkpoint_every(path)
            notice = reward_notice(cfg)
            if notice:
                print(notice, file=sys.stderr, flush=True)
        else:
            _prepare_fresh(path, cfg.overwrite)
        _remove_leftovers(path)
        _write_config(path, cfg)
        yield run
    finally:
        clean_temporaries(path)
        lock.release()
