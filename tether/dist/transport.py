"""Weight transport: the trainer publishes each weight version, rollout workers receive it.

Two backends behind one small interface: the trainer's side has ``publish(state_dict, version) -> SyncStats``,
a worker's side ``receive(version, *, timeout_s, receiver) -> (state_dict, SyncStats)``
(``--weight-transport fs | broadcast``).

The filesystem backend (as prime-rl's ``broadcast/step_N/STABLE``): version ``v`` is written as
``v{v:06d}.safetensors`` through a temporary name and ``os.replace`` (atomic on one file system), then a
ready marker ``v{v:06d}.ready`` holding its byte count is written the same way. A receiver waits for the marker,
never for the weights file, so it never reads a half-written version; on shared storage this works across nodes.
A receive that does not see the marker within ``timeout_s`` raises :class:`SyncTimeout` naming the receiver and
the version, instead of hanging (the trl#2923 failure mode).
"""

from __future__ import annotations

import datetime
import enum
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch


class WeightTransport(str, enum.Enum):
    FS = "fs"
    BROADCAST = "broadcast"


class SyncTimeout(RuntimeError):
    """A weight sync that did not complete within its timeout (names the receiver and the version)."""


class SyncFailed(RuntimeError):
    """A broadcast sync that failed on the trainer's or a receiver's side (the message names who and why)."""


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


HEADER_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool)}
"""The dtypes a broadcast header may name (looked up by name: a header never executes code)."""


def _left(deadline: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(deadline - time.perf_counter(), 1e-3))


class BroadcastTransport:
    """One member of a torch.distributed group of ``world`` processes: rank 0 (the trainer) publishes, ranks
    1..world-1 (the rollout workers) receive. Version ``v`` travels as three kinds of broadcast from rank 0:

        [v, n] (int64)  ->  header: n bytes of JSON [[name, dtype, shape], ...] (uint8)  ->  each tensor in order

    so a receiver needs no copy of the model's layout, and checks that it got the version it expected. Every
    broadcast of a sync gets the time left of its ``timeout_s`` (gloo and NCCL both honour a per-call timeout),
    so a receiver that dies mid-transfer makes the trainer's broadcast fail (connection closed, or the timeout)
    instead of hanging; the caller (the driver's pool) names the worker from the receivers' own results.

    The group is a process group of its own (``ProcessGroupGloo`` / ``ProcessGroupNCCL`` over ``store``), not
    the default one, so trainer ranks can keep theirs for FSDP; a group that lost a member is replaced by a new
    ``generation`` (a fresh key prefix in the same store), never repaired. ``backend``: ``gloo`` (CPU tensors) or
    ``nccl`` (tensors on ``device``, a CUDA device). ``host``: the address this member's gloo device binds.
    """

    def __init__(self, store, rank: int, world: int, *, generation: int, timeout_s: float, backend: str = "gloo",
                 host: str = "127.0.0.1", device: str | torch.device = "cpu") -> None:
        import torch.distributed as dist

        self.rank, self.world, self.generation = rank, world, generation
        self.device = torch.device(device)
        prefixed = dist.PrefixStore(f"tether-weights-{generation}/", store)
        timeout = datetime.timedelta(seconds=timeout_s)
        if backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.group = dist.ProcessGroupNCCL(prefixed, rank, world, opts)
        elif backend == "gloo":
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = timeout
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
            self.group = dist.ProcessGroupGloo(prefixed, rank, world, opts)
        else:
            raise ValueError(f"BroadcastTransport: backend must be gloo or nccl, got {backend!r}")

    @staticmethod
    def serve(host: str, timeout_s: float):
        """The trainer's rendezvous store (a ``TCPStore`` on a free port of ``host``; ``.port`` says which)."""
        import torch.distributed as dist

        return dist.TCPStore(host, 0, is_master=True, wait_for_workers=False,
                             timeout=datetime.timedelta(seconds=timeout_s))

    @staticmethod
    def join(host: str, port: int, timeout_s: float):
        """A worker's client of the trainer's store."""
        import torch.distributed as dist

        return dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))

    def _bcast(self, tensor: torch.Tensor, deadline: float) -> None:
        self.group.broadcast(tensor, 0, _left(deadline)).wait()

    def publish(self, state_dict: Mapping[str, torch.Tensor], version: int, *, timeout_s: float) -> SyncStats:
        """Rank 0: broadcast ``version`` (class docstring); blocks until every receiver has it, or raises."""
        assert self.rank == 0, "BroadcastTransport.publish runs on rank 0 (the trainer)"
        t0 = time.perf_counter()
        deadline = t0 + timeout_s
        tensors = [(k, v.detach().to(self.device).contiguous()) for k, v in state_dict.items()]
        header = json.dumps([[k, str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in tensors]).encode()
        self._bcast(torch.tensor([version, len(header)], dtype=torch.int64, device=self.device), deadline)
        self._bcast(torch.frombuffer(bytearray(header), dtype=torch.uint8).to(self.device), deadline)
        for _, v in tensors:
            self._bcast(v, deadline)
        size = sum(v.numel() * v.element_size() for _, v in tensors)
        return SyncStats(version, size, time.perf_counter() - t0)

    def receive(self, version: int, *, timeout_s: float, receiver: str,
                before_tensor: Callable[[int], None] | None = None) -> tuple[dict[str, torch.Tensor], SyncStats]:
        """Ranks >= 1: the weights of ``version`` from rank 0. :class:`SyncTimeout` (naming ``receiver``) when the
        trainer does not send it in time, :class:`SyncFailed` on a broken group or another version.
        ``before_tensor(i)``: called before the i-th tensor (fault tests kill the receiver mid-transfer)."""
        t0 = time.perf_counter()
        deadline = t0 + timeout_s
        try:
            head = torch.empty(2, dtype=torch.int64, device=self.device)
            self._bcast(head, deadline)
            got, n = (int(x) for x in head.tolist())
            if got != version:
                raise SyncFailed(f"{receiver}: expected weight version {version}, the trainer sent {got}")
            raw = torch.empty(n, dtype=torch.uint8, device=self.device)
            self._bcast(raw, deadline)
            spec = json.loads(bytes(raw.cpu().tolist()).decode())
            state = {}
            for i, (name, dtype, shape) in enumerate(spec):
                if before_tensor is not None:
                    before_tensor(i)
                t = torch.empty(shape, dtype=HEADER_DTYPES[dtype], device=self.device)
                self._bcast(t, deadline)
                state[name] = t
        except SyncFailed:
            raise
        except RuntimeError as e:
            if "Timed out" in str(e) or time.perf_counter() >= deadline:
                raise SyncTimeout(f"{receiver}: weight version {version} not received within {timeout_s:g} s "
                                  f"(broadcast generation {self.generation}): {e}") from e
            raise SyncFailed(f"{receiver}: the broadcast of weight version {version} failed: {e}") from e
        size = sum(v.numel() * v.element_size() for v in state.values())
        return state, SyncStats(version, size, time.perf_counter() - t0)
