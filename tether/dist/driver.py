"""The distributed driver (``--mode dist``): rollout workers generate, this process trains, over the shared run.

    for step s:  prompts (seed, s) -> groups split round-robin over the workers -> each worker generates its
                 groups on version s (group g seeded by (seed, s, g): worker.py) -> rows back in group order
                 -> score -> Run.learn -> publish version s + 1 (filesystem transport) -> every worker syncs
                 -> post-sync probe (each worker's log-probs of a fixed batch vs the trainer's) -> log -> checkpoint

A worker that dies mid-batch (Ray reports the actor dead) is replaced by a new one, cold-synced to the current
version, and given the dead worker's groups again; since a group's rows depend only on (weights, prompt, seed,
s, g), the batch is the one the dead worker would have returned: none lost, none trained twice
(``dist/episodes_requeued`` counts the re-queued rows, ``dist/worker_restarts`` the restarts).
What a step computes lives in ``tether/train/run.py``; this file only schedules it. Docs: docs/distributed.md.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from tether.dist.transport import FilesystemTransport, SyncStats
from tether.dist.worker import RolloutWorker
from tether.rollout import Rollout, concat_rows
from tether.train.config import TrainConfig
from tether.train.progress import Stopwatch
from tether.train.run import Batch, Given, Run
from tether.train.seeds import step_seed

PROBE_SALT = 4
"""Salt of the probe batch's prompts and samples (sync uses 1, async's refill 2 and 3)."""
KILL_ENV = "TETHER_DIST_TEST_KILL"
"""Test hook (issue 16 T4): ``WORKER,STEP,AFTER_GROUPS`` kills that worker's first incarnation mid-batch."""


def train(cfg: TrainConfig, given: Given | None = None) -> dict[str, Any]:
    """Run ``cfg`` to the end; ``given``: objects in place of names (``tether.Trainer``)."""
    import os

    if cfg.dist.trainer_ranks > 1 and "WORLD_SIZE" in os.environ and os.environ.get("RANK", "0") != "0":
        # under an external launcher (torchrun-style RANK / WORLD_SIZE on every node) ranks > 0 follow rank 0,
        # whose config they receive (tether/dist/ranks.py)
        from tether.dist.ranks import follow

        follow()
        return {}
    with Run(cfg, given=given, name=f"{cfg.task_stem}-{cfg.objective}-dist-{cfg.seed}") as run:
        return _drive(run)


class LocalPool:
    """``rollout_workers = 0``: one :class:`RolloutWorker` in this process (the same code as the actors)."""

    def __init__(self, cfg: TrainConfig, sync_dir: Path) -> None:
        self.workers = [RolloutWorker(cfg, str(sync_dir), "worker-0")]
        self.restarts = self.requeued = 0

    def __enter__(self) -> LocalPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def sync(self, version: int, timeout_s: float) -> list[SyncStats]:
        return [w.sync(version, timeout_s) for w in self.workers]

    def generate(self, step: int, groups: list[tuple[int, list[int]]], version: int, timeout_s: float):
        return self.workers[0].generate(step, groups)

    def probe(self, rollout: Rollout) -> list[torch.Tensor]:
        return [w.probe(rollout) for w in self.workers]


class RayPool:
    """``rollout_workers = N``: N :class:`RolloutWorker` Ray actors; a local cluster unless ``ray_address``."""

    def __init__(self, cfg: TrainConfig, sync_dir: Path) -> None:
        import ray

        self.ray, self.cfg, self.sync_dir, d = ray, cfg, sync_dir, cfg.dist
        self.own_cluster = not ray.is_initialized()
        if self.own_cluster:
            if d.ray_address:
                ray.init(address=d.ray_address, log_to_driver=False)
            else:  # a private local cluster on loopback, no dashboard
                ray.init(num_cpus=max(1, d.rollout_workers), include_dashboard=False, log_to_driver=False,
                         _node_ip_address="127.0.0.1")
        self.actor_cls = ray.remote(num_cpus=1, max_restarts=0)(RolloutWorker)
        kill = _kill_hook()
        self.workers = [self._start(i, die_at=kill[1] if kill and kill[0] == i else None)
                        for i in range(d.rollout_workers)]
        self.restarts = self.requeued = 0

    def _start(self, i: int, die_at=None):
        return self.actor_cls.remote(self.cfg, str(self.sync_dir), f"worker-{i}", die_at=die_at)

    def __enter__(self) -> RayPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        for w in self.workers:
            self.ray.kill(w)
        if self.own_cluster:
            self.ray.shutdown()

    def _get(self, refs: list, what: str, timeout_s: float) -> list:
        try:
            return self.ray.get(refs, timeout=timeout_s)
        except self.ray.exceptions.GetTimeoutError as e:
            raise TimeoutError(f"dist: {what} did not finish within {timeout_s:g} s (sync_timeout_s)") from e

    def sync(self, version: int, timeout_s: float) -> list[SyncStats]:
        refs = [w.sync.remote(version, timeout_s) for w in self.workers]
        return self._get(refs, f"the sync of weight version {version}", timeout_s + 30)

    def generate(self, step: int, groups: list[tuple[int, list[int]]], version: int, timeout_s: float):
        """Groups round-robin over the workers; a dead worker is restarted, cold-synced, and its groups re-run."""
        ray, N = self.ray, len(self.workers)
        shares = {i: groups[i::N] for i in range(N) if groups[i::N]}
        pending = {self.workers[i].generate.remote(step, share): i for i, share in shares.items()}
        out: list = []
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=timeout_s)
            if not ready:
                names = ", ".join(f"worker-{i}" for i in sorted(pending.values()))
                raise TimeoutError(f"dist: step {step}: no batch from {names} within {timeout_s:g} s")
            i = pending.pop(ready[0])
            try:
                out.extend(ray.get(ready[0]))
            except ray.exceptions.RayActorError:
                if self.restarts >= self.cfg.dist.max_worker_restarts:
                    raise
                self.restarts += 1
                self.requeued += len(shares[i]) * self.cfg.group_size
                self.workers[i] = self._start(i)  # cold start: the current version from the transport
                self._get([self.workers[i].sync.remote(version, timeout_s)], f"worker-{i}'s cold sync", timeout_s + 30)
                pending[self.workers[i].generate.remote(step, shares[i])] = i
        return out

    def probe(self, rollout: Rollout) -> list[torch.Tensor]:
        return self._get([w.probe.remote(rollout) for w in self.workers], "the post-sync probe",
                         self.cfg.dist.sync_timeout_s)


def _kill_hook() -> tuple[int, tuple[int, int]] | None:
    import os

    raw = os.environ.get(KILL_ENV)
    if not raw:
        return None
    worker, step, after = (int(x) for x in raw.split(","))
    return worker, (step, after)


def _drive(run: Run) -> dict[str, Any]:
    cfg, d = run.cfg, run.cfg.dist
    run.start()
    counters = run.state.counters
    for k in ("worker_restarts", "episodes_requeued"):
        counters.setdefault(k, 0)
    sync_dir = Path(d.sync_dir) if d.sync_dir else run.run_dir / "weights"
    transport = FilesystemTransport(sync_dir)
    # the fixed probe batch: sampled once by the trainer's engine on the starting weights
    probe = run.generate(run.sample(0, salt=PROBE_SALT, n=d.probe_prompts),
                         seed=step_seed(cfg.seed, 0, PROBE_SALT))
    t0 = time.perf_counter()
    with (LocalPool(cfg, sync_dir) if d.rollout_workers == 0 else RayPool(cfg, sync_dir)) as pool:
        start_s = time.perf_counter() - t0
        sync = _publish(run, transport, pool, probe)
        sync["dist/start_s"] = start_s
        with run.progress("RL dist") as progress:
            while run.state.step < cfg.steps:
                s = run.state.step
                clock = Stopwatch()
                examples = run.sample(s)
                prompts, _ = run.prompts(examples)
                groups = [(g, prompts[g * cfg.group_size]) for g in range(len(examples))]
                restarts, requeued = pool.restarts, pool.requeued
                with clock("rollout"):
                    parts = sorted(pool.generate(s, groups, s, d.sync_timeout_s), key=lambda p: p[0])
                assert [g for g, _ in parts] == list(range(len(examples))), "dist: a group is missing or doubled"
                rollout = concat_rows([r for _, r in parts], pad_id=run.engine.pad_id,
                                      vocab_size=run.engine.vocab_size)
                with clock("score"):
                    rewards_B, failed, by_reward, reward_metrics = run.score(rollout, examples)
                counters["worker_restarts"] += pool.restarts - restarts
                counters["episodes_requeued"] += pool.requeued - requeued
                batch = Batch(s, rollout, rewards_B, failed, examples=examples, failed_by_reward=by_reward, metrics={
                    **sync, **reward_metrics, "dist/worker_restarts": float(counters["worker_restarts"]),
                    "dist/episodes_requeued": float(counters["episodes_requeued"])})
                metrics = run.learn(batch, clock, progress.console)
                with clock("sync"):
                    sync = _publish(run, transport, pool, probe)
                run.record(metrics, batch, clock, progress)
                run.checkpoint_if_due()
    return run.finish()


def _publish(run: Run, transport: FilesystemTransport, pool, probe: Rollout) -> dict[str, float]:
    """Publish the trainer's current version, sync every worker to it, run the probe: the sync metrics
    (logged with the next step, whose rollouts use this version)."""
    d, v = run.cfg.dist, run.state.step
    sent = transport.publish(run.full_state()[0], v)  # sharded ranks: gathered to rank 0
    got = pool.sync(v, d.sync_timeout_s)
    ref_BT = run.policy_logprobs(probe)
    mask = probe.loss_mask_BT
    diff = max(float((lp - ref_BT).abs()[mask].max()) for lp in pool.probe(probe))
    out = {**sent.metrics(), "sync/seconds": sent.seconds + max(g.seconds for g in got),
           "sync/receive_seconds_max": max(g.seconds for g in got), "sync/probe_max_abs_logp_diff": diff}
    if diff > d.probe_max_logp_diff:
        out["alarm/sync_probe"] = 1
    return out
