"""A rollout worker: one engine, weights from the transport, generation per prompt group, the post-sync probe.

The same class runs in the trainer's process (``rollout_workers = 0``) and as a Ray actor, so the two paths
share every line. Group ``g`` of step ``s`` is generated alone, ``group_size`` samples of its prompt with seed
``group_seed(seed, s, g)``: its rows depend only on (weights, prompt, seed, s, g), never on which worker got it
or which other groups shared the call, which is what makes N workers train the same weights as one.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import torch

from tether.dist.transport import BroadcastTransport, FilesystemTransport, SyncStats, WeightTransport
from tether.rollout import Rollout
from tether.train import setup
from tether.train.config import TrainConfig
from tether.train.seeds import step_seed

GROUP_SALT = 1_000_000
"""Salt offset of the per-group sampling seeds (sync uses 1 and 1000 + c)."""


def group_seed(seed: int, step: int, group: int) -> int:
    """The sampling seed of prompt group ``group`` at step ``step``: ``step_seed(seed, step, GROUP_SALT + group)``."""
    return step_seed(seed, step, GROUP_SALT + group)


class RolloutWorker:
    """Builds the run's task and policy (the engine's architecture; its weights come from the transport).
    ``die_at = (step, after_groups)``: a test hook that SIGKILLs this process in the middle of that step's batch,
    after generating ``after_groups`` groups (fault tests, issue 16 T4). ``die_in_sync = (version, tensor)``: the
    same while receiving that tensor of that version over the broadcast transport (issue 16 T3).
    With the broadcast transport the worker has no transport until :meth:`connect` joins the trainer's group."""

    def __init__(self, cfg: TrainConfig, sync_dir: str, name: str, *, die_at: tuple[int, int] | None = None,
                 die_in_sync: tuple[int, int] | None = None) -> None:
        torch.set_num_threads(cfg.threads or 1)
        self.cfg, self.name, self.die_at, self.die_in_sync = cfg, name, die_at, die_in_sync
        task = setup.build_task(cfg)
        self.policy = setup.build_policy(cfg, task)
        self.engine = self.policy.engine
        self.sampling = setup.sampling_params(cfg)
        fs = cfg.dist is None or cfg.dist.weight_transport is WeightTransport.FS
        self.transport: FilesystemTransport | BroadcastTransport | None = FilesystemTransport(sync_dir) if fs else None
        self.store = None

    def connect(self, host: str, port: int, generation: int, rank: int, world: int, backend: str,
                timeout_s: float) -> str:
        """Join generation ``generation`` of the trainer's broadcast group as ``rank`` (blocks until all joined)."""
        if self.store is None:
            self.store = BroadcastTransport.join(host, port, timeout_s)
        self.transport = None  # drop the previous generation's group first
        own = host if host == "127.0.0.1" else _node_ip()  # the address this worker's gloo device binds
        self.transport = BroadcastTransport(self.store, rank, world, generation=generation, timeout_s=timeout_s,
                                            backend=backend, host=own,
                                            device=self.engine.device if backend == "nccl" else "cpu")
        return self.name

    def sync(self, version: int, timeout_s: float) -> SyncStats:
        """Receive ``version`` from the transport and load it into the engine."""
        if isinstance(self.transport, BroadcastTransport):
            state, stats = self.transport.receive(version, timeout_s=timeout_s, receiver=self.name,
                                                  before_tensor=self._die_in_sync(version))
        else:
            state, stats = self.transport.receive(version, timeout_s=timeout_s, receiver=self.name)
        self.engine.load_weights(state, version=version)
        return stats

    def _die_in_sync(self, version: int):
        if self.die_in_sync is None or self.die_in_sync[0] != version:
            return None
        at = self.die_in_sync[1]
        return lambda i: os.kill(os.getpid(), signal.SIGKILL) if i == at else None

    def generate(self, step: int, groups: list[tuple[int, list[int]]]) -> list[tuple[int, Rollout]]:
        """``group_size`` completions of each (group index, prompt ids) on the current weights."""
        out = []
        for i, (g, prompt) in enumerate(groups):
            if self.die_at is not None and self.die_at == (step, i):
                os.kill(os.getpid(), signal.SIGKILL)
            rollout = self.engine.generate([prompt], self.sampling, seed=group_seed(self.cfg.seed, step, g),
                                           n=self.cfg.group_size)
            out.append((g, rollout))
        return out

    def probe(self, rollout: Rollout) -> torch.Tensor:
        """Log-probs of ``rollout``'s tokens under the engine's weights (the trainer compares them with its own)."""
        with torch.no_grad():
            logp_BT, _ = setup.token_logprobs(self.engine.model, rollout, self.cfg)
        return logp_BT

    def version(self) -> int:
        return self.engine.version

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "pid": os.getpid(), "version": self.engine.version}


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()
