"""The asynchronous RL driver: the engine generates (and scores) in a thread while the trainer trains.

    producer thread:  for batch s: wait until version s - lag is published (admission)
                      -> generate in chunks, each on version s - lag + c (or the newest) -> score -> queue
    trainer (main):   take batch s -> staleness policy (wait / drop / downweight; tokens aged > k;
                      drop refills the batch with fresh groups sampled at version s)
                      -> Run.learn (old logits by the configured strategy, meter, update; run.py)
                      -> publish version s + 1

Every token carries the version that sampled it (``Rollout.version_BT``), so a completion generated
across a weight update records both versions. With ``freshest_weights=False`` (default) the
versions are a fixed function of (s, chunk) and every random draw is seeded by (seed, s, ...), so a
run is reproducible and a resumed run equals an uninterrupted one (the checkpoint carries the
weights the engine still needs). ``lag = 0`` is the sync loop, run through this machinery.
What a step computes lives in ``run.py``; this file only schedules it. Details and rules: docs/async.md.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import torch

from tether.rollout import concat_rows
from tether.train.config import StalenessPolicy, TrainConfig
from tether.train.old_logits import clone_state
from tether.train.progress import Stopwatch
from tether.train.run import Batch, Given, Run
from tether.train.seeds import step_seed
from tether.train.staleness import apply_staleness, drop_bias_metrics
from tether.train.weight_board import BoardClosed, EngineLease, WeightBoard

STALENESS_COUNTERS = ("stale_tokens", "stale_dropped_groups", "stale_refilled_groups", "downweighted_tokens")


def _generate_scored(run: Run, examples, *, seed_fn, before_chunk, chunk_tokens) -> Batch:
    """Generate ``group_size`` completions (or episodes) per example and score them (the caller sets the step)."""
    return run.collect(examples, seed_fn=seed_fn, before_chunk=before_chunk, chunk_tokens=chunk_tokens)


def _producer(run: Run, board: WeightBoard, lease: EngineLease, out: queue.Queue, start: int, stop: threading.Event):
    cfg, engine, lag = run.cfg.async_, run.engine, run.cfg.lag
    try:
        for s in range(start, run.cfg.steps):
            t0 = time.perf_counter()
            board.wait_for(s - lag)  # admission: never start a batch older than lag
            waited = time.perf_counter() - t0

            def before_chunk(c: int, s=s) -> None:
                v = board.latest if cfg.freshest_weights else max(0, min(s, s - lag + c))
                lease.release()  # never hold the engine while waiting for the trainer
                board.wait_for(v)
                lease.acquire()
                if v != engine.version:
                    engine.load_weights(board.get(v), version=v)

            try:
                batch = _generate_scored(run, run.sample(s), before_chunk=before_chunk,
                                         seed_fn=lambda c, s=s: step_seed(run.cfg.seed, s, 1 if c == 0 else 1000 + c),
                                         chunk_tokens=cfg.partial_chunk_tokens)
            finally:
                lease.release()
            batch.step = s
            batch.metrics["async/producer_wait_s"] = waited
            while not stop.is_set():
                try:
                    out.put(batch, timeout=0.5)
                    break
                except queue.Full:
                    pass
    except BoardClosed:
        pass
    except BaseException as e:  # handed to the trainer, which re-raises it
        out.put(e)


def refill_dropped(run: Run, board: WeightBoard, lease: EngineLease, batch: Batch, keep_B: torch.Tensor,
                   step: int) -> tuple[Batch, dict[str, float]]:
    """``drop``'s refill: as many fresh groups as were dropped, sampled at the trainer's version ``step``
    (age 0, so never beyond the bound: one round always fills the batch), appended to the kept rows.

    Deterministic: the prompts and samples are seeded by (seed, step, 2) and (seed, step, 3), and the
    weights are version ``step`` (restored on resume). Returns the refilled batch and its metrics.
    """
    kept_groups = torch.unique(batch.rollout.group_B[keep_B])
    n_new = run.cfg.prompts_per_step - int(kept_groups.numel())
    kept = batch.rollout.select(keep_B.nonzero().squeeze(-1))
    if n_new == 0:
        return (Batch(step, kept, batch.rewards_B[keep_B], batch.failed, failed_by_reward=batch.failed_by_reward),
                {"async/refilled_groups": 0.0})
    engine = run.engine
    with lease:
        if engine.version != step:
            engine.load_weights(board.get(step), version=step)
        fresh = _generate_scored(run, run.sample(step, salt=2, n=n_new), before_chunk=None, chunk_tokens=None,
                                 seed_fn=lambda c: step_seed(run.cfg.seed, step, 3))
    rollout = concat_rows([kept, fresh.rollout], pad_id=engine.pad_id, vocab_size=engine.vocab_size)
    metrics = {"async/refilled_groups": float(n_new), "time/refill_rollout_s": fresh.metrics["time/rollout_s"],
               "time/refill_score_s": fresh.metrics["time/score_s"]}
    by_reward = {k: v + (fresh.failed_by_reward or {}).get(k, 0) for k, v in (batch.failed_by_reward or {}).items()}
    return Batch(step, rollout, torch.cat([batch.rewards_B[keep_B], fresh.rewards_B]), batch.failed + fresh.failed,
                 scored=batch.rollout.batch_size + fresh.rollout.batch_size,
                 failed_by_reward=by_reward if batch.failed_by_reward is not None else None), metrics


def admit(run: Run, board: WeightBoard, lease: EngineLease, batch: Batch, clock: Stopwatch) -> Batch:
    """The staleness policy on token ages s - v (drop refills the batch with fresh groups); counted in the run."""
    cfg, s, rollout = run.cfg.async_, batch.step, batch.rollout
    keep_B, weight_BT, counts = apply_staleness(
        rollout.version_BT, rollout.loss_mask_BT, rollout.group_B, s, max_staleness=cfg.max_staleness,
        policy=cfg.staleness_policy, decay=cfg.downweight_decay)
    bias = drop_bias_metrics(batch.rewards_B, rollout.completion_len_B, keep_B)
    out = Batch(s, rollout, batch.rewards_B, batch.failed, keep_B=keep_B, weight_BT=weight_BT,
                failed_by_reward=batch.failed_by_reward, episodes=batch.episodes)  # the same rows: keep the episodes
    if cfg.staleness_policy is StalenessPolicy.DROP:
        with clock("refill"):
            out, refill = refill_dropped(run, board, lease, batch, keep_B, s)
        counts.update(refill, **{"async/batch_groups": float(torch.unique(out.rollout.group_B).numel())})
    counters = run.state.counters
    counters["stale_tokens"] += int(counts["async/stale_tokens"])
    counters["stale_dropped_groups"] += int(counts["async/dropped_groups"])
    counters["stale_refilled_groups"] += int(counts.get("async/refilled_groups", 0))
    counters["downweighted_tokens"] += int(counts["async/downweighted_tokens"])
    out.metrics = {**batch.metrics, **counts, **bias}
    return out


def train(cfg: TrainConfig, given: Given | None = None) -> dict[str, Any]:
    """Run ``cfg`` to the end; ``given``: objects in place of names (``tether.Trainer``)."""
    with Run(cfg, given=given, name=f"{cfg.task_stem}-{cfg.objective}-async-{cfg.seed}") as run:
        return _drive(run)


def _drive(run: Run) -> dict[str, Any]:
    cfg = run.cfg
    board, lease = WeightBoard(keep=cfg.lag), EngineLease()
    ckpt = run.start()
    for v, sd in sorted((ckpt["async"]["board"] if ckpt else {}).items()):
        board.publish(int(v), sd)
    board.publish(run.state.step, clone_state(run.model))
    for k in STALENESS_COUNTERS:
        run.state.counters.setdefault(k, 0)

    batches: queue.Queue = queue.Queue(maxsize=cfg.lag + 1)
    stop = threading.Event()
    producer = threading.Thread(target=_producer, args=(run, board, lease, batches, run.state.step, stop),
                                name="tether-rollout", daemon=True)
    producer.start()
    try:
        with run.progress("RL async") as progress:
            while run.state.step < cfg.steps:
                s = run.state.step
                clock = Stopwatch()
                with clock("trainer_wait"):
                    got = batches.get()
                if isinstance(got, BaseException):
                    raise got
                assert got.step == s, f"async loop: got batch {got.step} at step {s}"
                batch = admit(run, board, lease, got, clock)
                metrics = run.learn(batch, clock, progress.console)
                with clock("sync"):  # publish version s + 1 (the producer picks it up)
                    board.publish(run.state.step, clone_state(run.model))
                run.record(metrics, batch, clock, progress)
                kept = {v: sd for v, sd in board.weights.items() if run.state.step - cfg.lag <= v < run.state.step}
                run.checkpoint_if_due({"async": {"board": kept}})  # and a clean stop after a SIGINT / SIGTERM
    finally:
        stop.set()
        board.close()
        producer.join(timeout=60)
    return run.finish()
