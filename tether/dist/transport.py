"""Weight transport: the trainer publishes each weight version, rollout workers receive it.

The filesystem backend (as prime-rl's ``broadcast/step_N/STABLE``): version ``v`` is written as
``v{v:06d}.safetensors`` through a temporary name and ``os.replace`` (atomic on one file system), then a
ready marker ``v{v:06d}.ready`` holding its byte count is written the same way. A receiver waits for the marker,
never for the weights file, so it never reads a half-written version; on shared storage this works across nodes.
A receive that does not see the marker within ``timeout_s`` raises :class:`SyncTimeout` naming the receiver and
the version, instead of hanging (the trl#2923 failure mode).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch


class SyncTimeout(RuntimeError):
    """A weight sync that did not complete within its timeout (names the receiver and the version)."""


@dataclass
class SyncStats:
    """One publish or receive: ``sync/version``, ``sync/bytes``, ``sync/seconds``."""
    version: int
    bytes: int
    seconds: float

    def metrics(self, prefix: str = "sync/") -> dict[str, float]:
        return {f"{prefix}version": float(self.version), f"{prefix}bytes": float(self.bytes),
                f"{prefix}seconds": self.seconds}


class FilesystemTransport:
    """Safetensors file per version plus a ready marker under ``root`` (module docstring). Keeps the newest
    ``keep`` versions (older ones are deleted on publish)."""

    def __init__(self, root: str | Path, *, keep: int = 2, poll_s: float = 0.01) -> None:
        self.root = Path(root)
        self.keep = keep
        self.poll_s = poll_s
        self.root.mkdir(parents=True, exist_ok=True)

    def _weights(self, version: int) -> Path:
        return self.root / f"v{version:06d}.safetensors"

    def _marker(self, version: int) -> Path:
        return self.root / f"v{version:06d}.ready"

    def publish(self, state_dict: Mapping[str, torch.Tensor], version: int) -> SyncStats:
        from safetensors.torch import save_file

        t0 = time.perf_counter()
        # a private contiguous CPU copy of each tensor: safetensors refuses tensors that share storage
        tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}
        path = self._weights(version)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
        size = path.stat().st_size
        marker_tmp = self._marker(version).with_suffix(".ready-tmp")
        marker_tmp.write_text(str(size))
        os.replace(marker_tmp, self._marker(version))
        for old in sorted(self.root.glob("v*.ready"))[:-self.keep]:
            v = int(old.stem[1:])
            old.unlink(missing_ok=True)
            self._weights(v).unlink(missing_ok=True)
        return SyncStats(version, size, time.perf_counter() - t0)

    def receive(self, version: int, *, timeout_s: float, receiver: str) -> tuple[dict[str, torch.Tensor], SyncStats]:
        """The weights of ``version`` once its marker exists; :class:`SyncTimeout` after ``timeout_s``."""
        from safetensors.torch import load_file

        t0 = time.perf_counter()
        marker = self._marker(version)
        while not marker.exists():
            if time.perf_counter() - t0 > timeout_s:
                raise SyncTimeout(f"{receiver}: weight version {version} not ready in {self.root} after "
                                  f"{timeout_s:g} s (no {marker.name}); the trainer did not publish it or the "
                                  "storage is not shared")
            time.sleep(self.poll_s)
        path = self._weights(version)
        state = load_file(str(path))
        return state, SyncStats(version, path.stat().st_size, time.perf_counter() - t0)
