"""The asynchronous RL loop: the engine generates (and scores) in a thread while the trainer trains.

    producer thread:  for batch s: wait until version s - lag is published (admission)
                      -> generate in chunks, each on version s - lag + c (or the newest) -> score -> queue
    trainer (main):   take batch s -> staleness policy (wait / drop / downweight; tokens aged > k;
                      drop refills the batch with fresh groups sampled at version s)
                      -> old logits (recompute / snapshot / ewma / loglinear) -> meter
                      -> the sync loop's update -> publish version s + 1

Every token carries the version that sampled it (``Rollout.version_BT``), so a completion generated
across a weight update records both versions. With ``freshest_weights=False`` (default) the
versions are a fixed function of (s, chunk) and every random draw is seeded by (seed, s, ...), so a
run is reproducible and a resumed run equals an uninterrupted one (the checkpoint carries the
weights the engine still needs). ``lag = 0`` is the sync loop, run through this machinery.
Details and rules: docs/async.md.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tether.configs import to_dict
from tether.engine.partial import generate_partial
from tether.meter.measure import measure, to_floats
from tether.objectives import get_preset
from tether.objectives.advantages import get_advantage
from tether.objectives.kl import check_kl_combination
from tether.rollout import concat_rows
from tether.train import setup
from tether.train.checkpoint import load_latest_checkpoint, save_checkpoint
from tether.train.config import KLPlacement, OldLogits, StalenessPolicy, TrainConfig
from tether.train.metrics_log import MetricsLog
from tether.train.mismatch_control import MismatchControl
from tether.train.old_logits import OldLogitSource, clone_state
from tether.train.progress import StepProgress, Stopwatch
from tether.train.scoring import Scorer
from tether.train.shaping import informative_groups, soft_overlong_penalty
from tether.train.staleness import apply_staleness, drop_bias_metrics
from tether.train.summary import write_summary
from tether.train.sync import TrainingStopped, _update, finish_update, restore, step_seed
from tether.train.weight_board import BoardClosed, EngineLease, WeightBoard


@dataclass
class Batch:
    step: int
    rollout: Any
    rewards_B: torch.Tensor
    failed: int
    seconds: dict[str, float] = field(default_factory=dict)


def _generate_scored(cfg: TrainConfig, rewards: Scorer, policy, examples, *, seed_fn, before_chunk, chunk_tokens):
    """Generate ``group_size`` completions per example and score them: ``(rollout, rewards_B, failed, s)``."""
    t0 = time.perf_counter()
    prompts = [policy.tokenizer.encode(ex.prompt) for ex in examples for _ in range(cfg.group_size)]
    group_B = torch.arange(len(examples)).repeat_interleave(cfg.group_size)
    rollout = generate_partial(policy.engine, prompts, setup.sampling_params(cfg), group_B=group_B,
                               chunk_tokens=chunk_tokens, seed_fn=seed_fn, before_chunk=before_chunk)
    t1 = time.perf_counter()
    rewards_B, failed = setup.score(rewards, policy, rollout, examples, cfg)
    return rollout, rewards_B, failed, {"time/rollout_s": t1 - t0, "time/score_s": time.perf_counter() - t1}


def _producer(cfg: TrainConfig, rewards: Scorer, policy, board: WeightBoard, lease: EngineLease, out: queue.Queue, start: int,
              stop: threading.Event):
    engine, lag = policy.engine, cfg.lag
    try:
        for s in range(start, cfg.steps):
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
                rollout, rewards_B, failed, seconds = _generate_scored(
                    cfg, rewards, policy, setup.sample_examples(rewards.task, cfg, step_seed(cfg.seed, s)),
                    seed_fn=lambda c, s=s: step_seed(cfg.seed, s, 1 if c == 0 else 1000 + c),
                    before_chunk=before_chunk, chunk_tokens=cfg.partial_chunk_tokens)
            finally:
                lease.release()
            batch = Batch(s, rollout, rewards_B, failed, {"async/producer_wait_s": waited, **seconds})
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


def refill_dropped(cfg: TrainConfig, rewards: Scorer, policy, board: WeightBoard, lease: EngineLease, batch: Batch,
                   keep_B: torch.Tensor, step: int) -> tuple[Any, torch.Tensor, int, dict[str, float]]:
    """``drop``'s refill: as many fresh groups as were dropped, sampled at the trainer's version ``step``
    (age 0, so never beyond the bound: one round always fills the batch), appended to the kept rows.

    Deterministic: the prompts and samples are seeded by (seed, step, 2) and (seed, step, 3), and the
    weights are version ``step`` (restored on resume). Returns ``(rollout, rewards_B, failed, metrics)``.
    """
    kept_groups = torch.unique(batch.rollout.group_B[keep_B])
    n_new = cfg.prompts_per_step - int(kept_groups.numel())
    kept = batch.rollout.select(keep_B.nonzero().squeeze(-1))
    if n_new == 0:
        return kept, batch.rewards_B[keep_B], 0, {"async/refilled_groups": 0.0}
    examples = setup.sample_examples(rewards.task, cfg, step_seed(cfg.seed, step, 2))[:n_new]
    engine = policy.engine
    with lease:
        if engine.version != step:
            engine.load_weights(board.get(step), version=step)
        fresh, rewards_B, failed, seconds = _generate_scored(
            cfg, rewards, policy, examples, seed_fn=lambda c: step_seed(cfg.seed, step, 3), before_chunk=None,
            chunk_tokens=None)
    rollout = concat_rows([kept, fresh], pad_id=engine.pad_id, vocab_size=engine.vocab_size)
    metrics = {"async/refilled_groups": float(n_new), "time/refill_rollout_s": seconds["time/rollout_s"],
               "time/refill_score_s": seconds["time/score_s"]}
    return rollout, torch.cat([batch.rewards_B[keep_B], rewards_B]), failed, metrics


def train(cfg: TrainConfig) -> dict[str, Any]:
    with ExitStack() as cleanup:  # closed on every exit path: the reward's worker processes
        return _train(cfg, cleanup)


def _train(cfg: TrainConfig, cleanup: ExitStack) -> dict[str, Any]:
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.resume or cfg.out or f"runs/{Path(cfg.task).stem}-{cfg.objective}-async-{cfg.seed}")
    run_dir.mkdir(parents=True, exist_ok=True)
    preset = get_preset(cfg.objective)
    objective_args = preset.resolve(cfg.objective_args)
    advantage_fn = get_advantage(preset.advantage)
    if cfg.kl_placement is not KLPlacement.NONE:
        check_kl_combination(cfg.kl_estimator, cfg.kl_placement.value)

    task = setup.build_task(cfg)
    policy = setup.build_policy(cfg, task)
    model, engine = policy.model, policy.engine
    ref_model = setup.frozen_copy(model) if cfg.kl_placement is not KLPlacement.NONE else None
    optimizer, scheduler = setup.build_optimizer(cfg, model)
    keep = max(cfg.lag, cfg.max_staleness) + 1  # the oldest version a consumed token can have
    board, lease = WeightBoard(keep=cfg.lag), EngineLease()
    old_logits = OldLogitSource(cfg.old_logits, model, lambda m, r: setup.token_logprobs(m, r, cfg),
                                keep_versions=keep, ewma_beta=cfg.ewma_beta)

    ckpt = load_latest_checkpoint(run_dir) if cfg.resume else None
    state = restore(ckpt, model, optimizer, scheduler, ref_model)
    if ckpt is not None:
        for v, sd in sorted(ckpt["async"]["board"].items()):
            board.publish(int(v), sd)
        old_logits.load_state_dict(ckpt["async"]["old_logits"])
    else:
        old_logits.publish(0)
    board.publish(state.step, clone_state(model))
    engine.load_weights(model.state_dict(), version=state.step)
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    log = MetricsLog(run_dir / "metrics.jsonl", resume_after_step=state.step - 1 if ckpt else None)
    control = MismatchControl(cfg, objective_args, state.mismatch_control, state.counters)  # budget actions, auto
    rewards = cleanup.enter_context(Scorer(task, cfg, state.counters))  # the reward's workers, failure counts, stop rule
    if state.accuracy_before is None:
        state.accuracy_before = setup.evaluate(policy, rewards, cfg)
    for k in ("stale_tokens", "stale_dropped_groups", "stale_refilled_groups", "downweighted_tokens"):
        state.counters.setdefault(k, 0)

    batches: queue.Queue = queue.Queue(maxsize=cfg.lag + 1)
    stop = threading.Event()
    producer = threading.Thread(target=_producer, args=(cfg, rewards, policy, board, lease, batches, state.step, stop),
                                name="tether-rollout", daemon=True)
    producer.start()
    t_start, tokens_total = time.perf_counter(), 0
    try:
        with StepProgress(total=cfg.steps, start=state.step, enabled=cfg.progress, description="RL async") as progress:
            while state.step < cfg.steps:
                s = state.step
                clock = Stopwatch()
                with clock("trainer_wait"):
                    batch = batches.get()
                if isinstance(batch, BaseException):
                    raise batch
                assert batch.step == s, f"async loop: got batch {batch.step} at step {s}"
                rollout, rewards_B = batch.rollout, batch.rewards_B
                rewards.record(batch.failed, batch.rollout.batch_size, s)  # counted per reward; stops if all fail K steps
                mask_BT = rollout.loss_mask_BT
                # 1. staleness policy on token ages s - v; drop refills the batch with fresh groups
                keep_B, weight_BT, counts = apply_staleness(
                    rollout.version_BT, mask_BT, rollout.group_B, s, max_staleness=cfg.max_staleness,
                    policy=cfg.staleness_policy, decay=cfg.downweight_decay)
                bias = drop_bias_metrics(rewards_B, rollout.completion_len_B, keep_B)
                if cfg.staleness_policy is StalenessPolicy.DROP:
                    with clock("refill"):
                        rollout, rewards_B, failed, refill = refill_dropped(cfg, rewards, policy, board, lease, batch,
                                                                            keep_B, s)
                    rewards.record(failed, int(refill["async/refilled_groups"]) * cfg.group_size, s)
                    counts.update(refill, **{"async/batch_groups": float(torch.unique(rollout.group_B).numel())})
                    mask_BT = rollout.loss_mask_BT
                    keep_B = torch.ones(rollout.batch_size, dtype=torch.bool)
                    weight_BT = torch.ones(mask_BT.shape, dtype=torch.float32)
                state.counters["stale_tokens"] += int(counts["async/stale_tokens"])
                state.counters["stale_dropped_groups"] += int(counts["async/dropped_groups"])
                state.counters["stale_refilled_groups"] += int(counts.get("async/refilled_groups", 0))
                state.counters["downweighted_tokens"] += int(counts["async/downweighted_tokens"])
                raw_reward_mean = rewards_B.mean()
                if cfg.overlong_buffer is not None:
                    rewards_B = rewards_B + soft_overlong_penalty(
                        rollout.completion_len_B, cfg.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty)
                # 2. old logits: pi_{theta_s} (skipped by loglinear, which needs no extra forward) and the anchor
                # As in the sync loop: with one mini-batch and no micro-batching, the forward at the current
                # weights is also the update's first forward (run once, with gradients).
                need_current = cfg.old_logits is not OldLogits.LOGLINEAR or cfg.kl_placement is KLPlacement.REWARD
                one_forward = (need_current and cfg.old_logits is not OldLogits.LOGLINEAR and cfg.minibatches == 1
                               and (cfg.micro_batch_size or rollout.batch_size) >= rollout.batch_size)
                with clock("recompute"), torch.no_grad():
                    t0 = time.perf_counter()
                    with torch.set_grad_enabled(one_forward):
                        theta_BT, entropy_BT = (setup.token_logprobs(model, rollout, cfg) if need_current
                                                else (None, None))
                    current_BT = None if theta_BT is None else theta_BT.detach()
                    entropy_BT = None if entropy_BT is None else entropy_BT.detach()
                    current_s = time.perf_counter() - t0
                    anchor_BT, behave_BT, old_s = old_logits.anchor(rollout, current_BT)
                    if cfg.old_logits is OldLogits.RECOMPUTE:  # its anchor is that forward
                        old_s += current_s
                    logp_ref_BT = setup.token_logprobs(ref_model, rollout, cfg)[0] if ref_model is not None else None
                if cfg.kl_placement is KLPlacement.REWARD:
                    rewards_B = rewards_B + setup.kl_reward(current_BT, logp_ref_BT, mask_BT, cfg)
                if cfg.dynamic_sampling:
                    info_B = informative_groups(rewards_B, rollout.group_B)
                    state.counters["dropped_groups"] += int((keep_B & ~info_B).sum()) // cfg.group_size
                    keep_B = keep_B & info_B
                advantages_BT = advantage_fn(rewards_B, rollout.group_B)[:, None].float() * mask_BT * weight_BT
                with clock("meter"):
                    metrics: dict[str, Any] = _meter(rollout, current_BT, behave_BT, entropy_BT, s)
                    try:
                        step_args = control.apply(metrics, optimizer, scheduler, step=s, console=progress.console,
                                                  where=str(run_dir / "checkpoints"))
                    except TrainingStopped:  # the stopping step's measurements are kept, not dropped
                        log.write({**metrics, "step": s, "budget/stopped": 1})
                        raise
                # 3. update: the sync loop's epochs x mini-batches; loglinear makes its anchor per micro-batch
                old_for_loss = anchor_BT if anchor_BT is not None else rollout.logp_mu_BT
                finite = bool(torch.isfinite(torch.where(mask_BT, old_for_loss, 0)).all()
                              and torch.isfinite(rollout.logp_mu_BT).all())
                if finite and keep_B.any():
                    with clock("update"):
                        update = _update(cfg, preset, step_args, model, optimizer, rollout, keep_B, old_for_loss,
                                         logp_ref_BT, advantages_BT, s, prox_fn=old_logits.prox_fn(rollout, s),
                                         first_logp_theta_BT=theta_BT if one_forward else None)
                    finite = update.pop("finite")
                    metrics.update(update)
                finish_update(cfg, state, metrics, scheduler, finite, step=s, run_dir=run_dir, console=progress.console)
                # 4. publish version s + 1 (the producer picks it up); the strategies' state moves with it
                state.step += 1
                with clock("sync"):
                    board.publish(state.step, clone_state(model))
                    old_logits.publish(state.step)
                n_tokens = int(rollout.completion_len_B.sum())
                tokens_total += n_tokens
                dt = clock.total()
                metrics.update({
                    "step": s, "reward/mean": raw_reward_mean, "reward/shaped_mean": rewards_B.mean(),
                    "reward/failed": batch.failed, "length/mean": rollout.completion_len_B.float().mean(),
                    **clock.metrics(), **batch.seconds, **counts, **bias, "time/step_s": dt,
                    "time/old_logits_s": old_s, "mem/old_logits_bytes": old_logits.extra_bytes(),
                    "async/version_min": int(rollout.version_BT[mask_BT].min()) if mask_BT.any() else s,
                    "perf/tokens_per_s": n_tokens / dt, "lr": scheduler.get_last_lr()[0],
                })
                log.write(metrics)
                progress.advance(metrics)
                if state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps:
                    kept = {v: sd for v, sd in board.weights.items() if state.step - cfg.lag <= v < state.step}
                    save_checkpoint(run_dir, state.step, {
                        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "run_state": state.__dict__,
                        "async": {"board": kept, "old_logits": old_logits.state_dict()},
                        **({"ref_model": ref_model.state_dict()} if ref_model is not None else {}),
                    })
    finally:
        stop.set()
        board.close()
        producer.join(timeout=60)
    engine.load_weights(model.state_dict(), version=state.step)
    accuracy_after = setup.evaluate(policy, rewards, cfg)
    counters = {**state.counters, "bad_rows_skipped": getattr(task, "n_skipped", 0)}
    return write_summary(run_dir, to_dict(cfg), counters, state.accuracy_before, accuracy_after, tokens_total,
                         time.perf_counter() - t_start)


def _meter(rollout, current_BT, behave_BT, entropy_BT, step: int) -> dict[str, Any]:
    """The meter with pi_old = pi_{theta_s} and, under snapshot, pi_old at the behaviour version too
    (then engine / staleness are separated exactly). loglinear has no pi_old: versions only."""
    mask = rollout.loss_mask_BT
    stats = measure(mask_BT=mask, logp_old_BT=current_BT, logp_mu_BT=rollout.logp_mu_BT,
                    logp_behave_old_BT=behave_BT, entropy_BT=entropy_BT, version_BT=rollout.version_BT,
                    current_version=step, profiles=False)
    if current_BT is not None:
        diff = (current_BT - rollout.logp_mu_BT).abs()
        stats["mismatch/abs_logp_diff_mean"] = (diff * mask).sum() / mask.sum().clamp(min=1)
        stats["mismatch/abs_logp_diff_max"] = torch.where(mask, diff, 0).max() if mask.any() else torch.zeros(())
        stats["entropy/mean"] = (entropy_BT * mask).sum() / mask.sum().clamp(min=1)
    return to_floats(stats)
