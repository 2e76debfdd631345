"""The distributed driver (``--mode dist``): rollout workers generate, this process trains, over the shared run.

    for step s:  prompts (seed, s) -> groups split round-robin over the workers -> each worker generates its
                 groups on version s (group g seeded by (seed, s, g): worker.py) -> rows back in group order
                 -> score -> Run.learn -> publish version s + 1 (fs or broadcast transport) -> every worker syncs
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

from tether.dist.transport import BroadcastTransport, FilesystemTransport, SyncFailed, SyncStats, WeightTransport
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
KILL_SYNC_ENV = "TETHER_DIST_TEST_KILL_SYNC"
"""Test hook (issue 16 T3): ``WORKER,VERSION,TENSOR`` kills that worker's first incarnation while it receives that
tensor of that version over the broadcast transport."""


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

    def __init__(self, cfg: TrainConfig, sync_dir: Path, state_fn=None) -> None:
        self.workers = [RolloutWorker(cfg, str(sync_dir), "worker-0")]
        self.sender = FilesystemTransport(sync_dir)
        self.restarts = self.requeued = 0

    def __enter__(self) -> LocalPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def sync(self, version: int, timeout_s: float, state=None) -> tuple[SyncStats | None, list[SyncStats]]:
        sent = None if state is None else self.sender.publish(state, version)
        return sent, [w.sync(version, timeout_s) for w in self.workers]

    def recover(self) -> bool:
        return False

    def generate(self, step: int, groups: list[tuple[int, list[int]]], version: int, timeout_s: float):
        return self.workers[0].generate(step, groups)

    def probe(self, rollout: Rollout) -> list[torch.Tensor]:
        return [w.probe(rollout) for w in self.workers]


class RayPool:
    """``rollout_workers = N``: N :class:`RolloutWorker` Ray actors; a local cluster unless ``ray_address``.
    ``state_fn()``: the trainer's current weights (a broadcast cold sync sends them again to the whole group)."""

    def __init__(self, cfg: TrainConfig, sync_dir: Path, state_fn=None) -> None:
        import ray

        self.ray, self.cfg, self.sync_dir, d = ray, cfg, sync_dir, cfg.dist
        self.state_fn, self.version, self.dead = state_fn, None, set()
        self.own_cluster = not ray.is_initialized()
        if self.own_cluster:
            if d.ray_address:
                ray.init(address=d.ray_address, log_to_driver=False)
            else:  # a private local cluster on loopback, no dashboard
                ray.init(num_cpus=max(1, d.rollout_workers), include_dashboard=False, log_to_driver=False,
                         _node_ip_address="127.0.0.1")
        self.actor_cls = ray.remote(num_cpus=1, max_restarts=0)(RolloutWorker)
        kill, kill_sync = _kill_hook(KILL_ENV), _kill_hook(KILL_SYNC_ENV)
        self.workers = [self._start(i, die_at=kill[1] if kill and kill[0] == i else None,
                                    die_in_sync=kill_sync[1] if kill_sync and kill_sync[0] == i else None)
                        for i in range(d.rollout_workers)]
        self.restarts = self.requeued = 0
        self.broadcast = d.weight_transport is WeightTransport.BROADCAST
        if self.broadcast:  # the trainer is rank 0 of a group with every worker (transport.BroadcastTransport)
            self.host = ray.util.get_node_ip_address() if d.ray_address else "127.0.0.1"
            self.backend = "nccl" if cfg.device == "cuda" else "gloo"
            self.store, self.generation, self.sender = BroadcastTransport.serve(self.host, d.sync_timeout_s), 0, None
            self._connect()
        else:
            self.sender = FilesystemTransport(sync_dir)

    def _start(self, i: int, die_at=None, die_in_sync=None):
        return self.actor_cls.remote(self.cfg, str(self.sync_dir), f"worker-{i}", die_at=die_at,
                                     die_in_sync=die_in_sync)

    def _connect(self) -> None:
        """A new generation of the broadcast group: every worker and the trainer join it (bounded in time)."""
        self.generation += 1
        self.sender, world, timeout_s = None, len(self.workers) + 1, self.cfg.dist.sync_timeout_s
        # built first (their start-up is not the sync's), so that the join below waits only on the rendezvous
        self._collect([w.info.remote() for w in self.workers], "starting the rollout workers", timeout_s)
        refs = [w.connect.remote(self.host, self.store.port, self.generation, i + 1, world, self.backend, timeout_s)
                for i, w in enumerate(self.workers)]
        try:
            self.sender = BroadcastTransport(self.store, 0, world, generation=self.generation, timeout_s=timeout_s,
                                             backend=self.backend, host=self.host,
                                             device="cuda" if self.backend == "nccl" else "cpu")
        except RuntimeError as e:
            self._collect(refs, f"joining broadcast group {self.generation}", timeout_s, e)
        self._collect(refs, f"joining broadcast group {self.generation}", timeout_s)

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

    def _collect(self, refs: list, what: str, timeout_s: float, trainer_error: Exception | None = None) -> list:
        """Every worker's result, or :class:`SyncFailed` naming each worker that failed and why (its own error,
        dead, or no answer in time) and the trainer's side; dead workers are remembered for :meth:`recover`."""
        ray, out, failures = self.ray, [], []
        deadline = time.perf_counter() + timeout_s + 30  # the workers bound their own waits by timeout_s
        for i, ref in enumerate(refs):
            try:
                out.append(ray.get(ref, timeout=max(deadline - time.perf_counter(), 0.1)))
            except ray.exceptions.RayActorError as e:
                self.dead.add(i)
                failures.append(f"worker-{i} died ({type(e).__name__})")
            except ray.exceptions.GetTimeoutError:
                failures.append(f"worker-{i} did not answer within {timeout_s:g} s")
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None) or e
                failures.append(f"worker-{i}: {type(cause).__name__}: {str(cause).strip().splitlines()[-1][:500]}")
        if trainer_error is not None:
            failures.append(f"trainer: {type(trainer_error).__name__}: {str(trainer_error)[:500]}")
        if failures:
            raise SyncFailed(f"dist: {what} failed: " + "; ".join(failures))
        return out

    def sync(self, version: int, timeout_s: float, state=None) -> tuple[SyncStats | None, list[SyncStats]]:
        """Publish ``state`` as ``version`` (none: only receive) and have every worker load it."""
        refs = [w.sync.remote(version, timeout_s) for w in self.workers]
        sent, error = None, None
        try:
            if state is not None:
                sent = (self.sender.publish(state, version, timeout_s=timeout_s) if self.broadcast
                        else self.sender.publish(state, version))
        except RuntimeError as e:  # a broken broadcast group: the receivers' results say who and why
            error = e
        got = self._collect(refs, f"the sync of weight version {version}", timeout_s, error)
        self.version = version
        return sent, got

    def recover(self) -> bool:
        """After a failed sync: replace the workers that died (counted) and rebuild the broadcast group.
        False when none died or no restart is left (the caller re-raises)."""
        if not self.dead or self.restarts + len(self.dead) > self.cfg.dist.max_worker_restarts:
            return False
        for i in sorted(self.dead):
            self.restarts += 1
            self.workers[i] = self._start(i)
        self.dead.clear()
        if self.broadcast:
            self._connect()
        return True

    def _cold_sync(self, i: int, version: int, timeout_s: float) -> None:
        """A new worker ``i`` to ``version``: from the file (fs), or a new group and a broadcast to all."""
        if not self.broadcast:
            self._collect([self.workers[i].sync.remote(version, timeout_s)], f"worker-{i}'s cold sync", timeout_s)
            return
        self._connect()
        self.sync(version, timeout_s, self.state_fn())

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
                self._cold_sync(i, version, timeout_s)
                pending[self.workers[i].generate.remote(step, shares[i])] = i
        return out

    def probe(self, rollout: Rollout) -> list[torch.Tensor]:
        return self._get([w.probe.remote(rollout) for w in self.workers], "the post-sync probe",
                         self.cfg.dist.sync_timeout_s)


def _kill_hook(env: str) -> tuple[int, tuple[int, int]] | None:
    import os

    raw = os.environ.get(env)
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
    # the fixed probe batch: sampled once by the trainer's engine on the starting weights
    probe = run.generate(run.sample(0, salt=PROBE_SALT, n=d.probe_prompts),
                         seed=step_seed(cfg.seed, 0, PROBE_SALT))
    t0 = time.perf_counter()
    pool_cls = LocalPool if d.rollout_workers == 0 else RayPool
    with pool_cls(cfg, sync_dir, state_fn=run.model.state_dict) as pool:
        start_s = time.perf_counter() - t0
        sync = _publish(run, pool, probe)
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
                    sync = _publish(run, pool, probe)
                run.record(metrics, batch, clock, progress)
                run.checkpoint_if_due()
    return run.finish()


def _publish(run: Run, pool, probe: Rollout) -> dict[str, float]:
    """Publish the trainer's current version, sync every worker to it, run the probe: the sync metrics
    (logged with the next step, whose rollouts use this version). A sync that fails because a worker died
    is retried once after the pool replaced it (``dist/worker_restarts``); any other failure stops the run."""
    d, v = run.cfg.dist, run.state.step
    t0 = time.perf_counter()
    restarts = pool.restarts
    weights = run.full_state()[0]  # sharded ranks: gathered to rank 0
    try:
        sent, got = pool.sync(v, d.sync_timeout_s, weights)
    except SyncFailed:
        if not pool.recover():
            raise
        sent, got = pool.sync(v, d.sync_timeout_s, weights)
    run.state.counters["worker_restarts"] += pool.restarts - restarts
    seconds = time.perf_counter() - t0
    ref_BT = run.policy_logprobs(probe)
    mask = probe.loss_mask_BT
    diff = max(float((lp - ref_BT).abs()[mask].max()) for lp in pool.probe(probe))
    out = {**sent.metrics(), "sync/seconds": seconds, "sync/publish_seconds": sent.seconds,
           "sync/receive_seconds_max": max(g.seconds for g in got), "sync/probe_max_abs_logp_diff": diff}
    if diff > d.probe_max_logp_diff:
        out["alarm/sync_probe"] = 1
    return out
