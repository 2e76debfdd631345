"""The synchronous RL loop, top to bottom.

    rollout (engine, behaviour log-probs mu) -> score -> advantages -> recompute pi_old
    -> meter -> mini-batch epochs of the objective preset -> optimiser -> weights to the engine

The loop is algorithm-blind: the preset names its advantage estimator and its loss; the loop only
fills ``LossInputs``. Every random draw of step ``s`` comes from generators seeded by (seed, s), and
the checkpoint holds model, optimiser and scheduler state, so a resumed run is bitwise identical to an
uninterrupted one on CPU.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tether.configs import to_dict
from tether.objectives import LossInputs, aggregate, get_preset
from tether.objectives.advantages import get_advantage
from tether.objectives.kl import check_kl_combination
from tether.train import setup
from tether.train.checkpoint import load_latest_checkpoint, save_checkpoint
from tether.train.config import KLPlacement, TrainConfig
from tether.train.loggers import open_loggers
from tether.train.metrics_log import MetricsLog
from tether.train.mismatch_control import MismatchControl
from tether.train.progress import StepProgress, Stopwatch
from tether.train.scoring import Scorer
from tether.train.shaping import informative_groups, soft_overlong_penalty
from tether.train.summary import write_summary


class TrainingStopped(RuntimeError):
    """Raised when the run must stop (too many consecutive non-finite steps, a mismatch budget)."""


@dataclass
class RunState:
    step: int = 0
    bad_steps: int = 0
    accuracy_before: float | None = None
    counters: dict[str, int] = field(default_factory=lambda: {"reward_failed": 0, "skipped_steps": 0, "dropped_groups": 0})
    mismatch_control: dict[str, float] = field(default_factory=dict)


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    return (seed * 1_000_003 + step * 7919 + salt) % (2**63 - 1)


def train(cfg: TrainConfig) -> dict[str, Any]:
    with ExitStack() as cleanup:  # closed on every exit path: the reward's worker processes
        return _train(cfg, cleanup)


def _train(cfg: TrainConfig, cleanup: ExitStack) -> dict[str, Any]:
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.resume or cfg.out or f"runs/{Path(cfg.task).stem}-{cfg.objective}-{cfg.seed}")
    run_dir.mkdir(parents=True, exist_ok=True)
    preset = get_preset(cfg.objective)
    objective_args = preset.resolve(cfg.objective_args)  # validate overrides before any compute
    advantage_fn = get_advantage(preset.advantage)
    if cfg.kl_placement is not KLPlacement.NONE:
        check_kl_combination(cfg.kl_estimator, cfg.kl_placement.value)

    task = setup.build_task(cfg)
    policy = setup.build_policy(cfg, task)  # model, tokenizer, engine (its own copy of the weights)
    model, engine = policy.model, policy.engine
    ref_model = setup.frozen_copy(model) if cfg.kl_placement is not KLPlacement.NONE else None
    optimizer, scheduler = setup.build_optimizer(cfg, model)

    ckpt = load_latest_checkpoint(run_dir) if cfg.resume else None
    state = restore(ckpt, model, optimizer, scheduler, ref_model)
    engine.load_weights(model.state_dict(), version=state.step)
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    control = MismatchControl(cfg, objective_args, state.mismatch_control, state.counters)  # budget actions, auto correction
    rewards = cleanup.enter_context(Scorer(task, cfg, state.counters))  # the reward's workers, failure counts, stop rule
    log = open_loggers(cfg, run_dir, MetricsLog(run_dir / "metrics.jsonl", resume_after_step=state.step - 1 if ckpt else None))

    if state.accuracy_before is None:
        state.accuracy_before = setup.evaluate(policy, rewards, cfg)
    t_start, tokens_total = time.perf_counter(), 0
    with StepProgress(total=cfg.steps, start=state.step, enabled=cfg.progress) as progress:
        while state.step < cfg.steps:
            step = state.step
            clock = Stopwatch()
            with clock("rollout"):  # 1. the engine samples; records log mu, versions, truncation
                examples = setup.sample_examples(task, cfg, step_seed(cfg.seed, step))
                rollout = setup.generate(policy, examples, cfg, seed=step_seed(cfg.seed, step, 1))
            with clock("score"):  # 2. score (failed reward calls count and get 0), shape
                rewards_B, failed = setup.score(rewards, policy, rollout, examples, cfg)
                rewards.record(failed, rollout.batch_size, step)  # counted per reward; stops if all fail K steps
                raw_reward_mean = rewards_B.mean()
                if cfg.overlong_buffer is not None:
                    rewards_B = rewards_B + soft_overlong_penalty(
                        rollout.completion_len_B, cfg.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty)
            mask_BT = rollout.loss_mask_BT
            # 3. pi_old under the engine's sampling transform. With one mini-batch and no micro-batching
            # the update's forward is at these same weights over these same rows: run it once, with
            # gradients, and hand its graph to the update (pi_old is its detached value).
            one_forward = cfg.minibatches == 1 and (cfg.micro_batch_size or rollout.batch_size) >= rollout.batch_size
            with clock("recompute"):
                with torch.set_grad_enabled(one_forward):
                    logp_theta_BT, entropy_BT = setup.token_logprobs(model, rollout, cfg)
                logp_old_BT, entropy_BT = logp_theta_BT.detach(), entropy_BT.detach()
                with torch.no_grad():
                    logp_ref_BT = setup.token_logprobs(ref_model, rollout, cfg)[0] if ref_model is not None else None
            if cfg.kl_placement is KLPlacement.REWARD:
                rewards_B = rewards_B + setup.kl_reward(logp_old_BT, logp_ref_BT, mask_BT, cfg)
            # 4. advantages (the preset's estimator), dynamic sampling
            keep_B = (informative_groups(rewards_B, rollout.group_B) if cfg.dynamic_sampling
                      else torch.ones_like(rewards_B, dtype=torch.bool))
            state.counters["dropped_groups"] += int((~keep_B).sum()) // cfg.group_size
            advantages_BT = advantage_fn(rewards_B, rollout.group_B)[:, None].to(logp_old_BT.dtype) * mask_BT
            with clock("meter"):
                metrics: dict[str, Any] = setup.mismatch_metrics(logp_old_BT, rollout, entropy_BT, step)
                try:
                    step_args = control.apply(metrics, optimizer, scheduler, step=step, console=progress.console,
                                              where=str(run_dir / "checkpoints"))
                except TrainingStopped:  # the stopping step's measurements are kept, not dropped
                    log.write({**metrics, "step": step, "budget/stopped": 1})
                    raise
            # 5. update: epochs x mini-batches x micro-batches with global normalisers
            finite = bool(torch.isfinite(torch.where(mask_BT, logp_old_BT, 0)).all()
                          and torch.isfinite(rollout.logp_mu_BT).all())
            if finite and keep_B.any():
                with clock("update"):
                    update = _update(cfg, preset, step_args, model, optimizer, rollout, keep_B,
                                     logp_old_BT, logp_ref_BT, advantages_BT, step,
                                     first_logp_theta_BT=logp_theta_BT if one_forward else None)
                finite = update.pop("finite")
                metrics.update(update)
            finish_update(cfg, state, metrics, scheduler, finite, step=step, run_dir=run_dir, console=progress.console)
            # 6. weights to the engine: the next rollout is version step + 1
            state.step += 1
            with clock("sync"):
                engine.load_weights(model.state_dict(), version=state.step)
            n_tokens = int(rollout.completion_len_B.sum())
            tokens_total += n_tokens
            dt = clock.total()
            metrics.update({
                "step": step, "reward/mean": raw_reward_mean, "reward/shaped_mean": rewards_B.mean(),
                "reward/failed": failed, "length/mean": rollout.completion_len_B.float().mean(),
                **clock.metrics(), "time/step_s": dt, "perf/tokens_per_s": n_tokens / dt, "lr": scheduler.get_last_lr()[0],
            })
            log.write(metrics)
            progress.advance(metrics)
            if state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps:
                save_checkpoint(run_dir, state.step, {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "run_state": state.__dict__,
                    **({"ref_model": ref_model.state_dict()} if ref_model is not None else {}),
                })
    log.close()  # flush TensorBoard / W&B / MLflow
    accuracy_after = setup.evaluate(policy, rewards, cfg)
    counters = {**state.counters, "bad_rows_skipped": getattr(task, "n_skipped", 0)}
    return write_summary(run_dir, to_dict(cfg), counters, state.accuracy_before, accuracy_after, tokens_total,
                         time.perf_counter() - t_start)


def restore(ckpt: dict[str, Any] | None, model, optimizer, scheduler, ref_model) -> RunState:
    """Load a checkpoint's model, optimiser, scheduler (and reference model) state in place; returns
    its run state, or a fresh one when there is no checkpoint."""
    if ckpt is None:
        return RunState()
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if ref_model is not None:
        ref_model.load_state_dict(ckpt["ref_model"])
    return RunState(**ckpt["run_state"])


def finish_update(cfg: TrainConfig, state: RunState, metrics: dict[str, Any], scheduler, finite: bool, *, step: int,
                  run_dir: Path, console) -> None:
    """After a step's update: advance the LR schedule, or count a non-finite step (skipped, alarmed)
    and stop once ``cfg.max_bad_steps`` of them come in a row (the last checkpoint stays intact)."""
    if finite:
        scheduler.step()
        state.bad_steps = 0
        return
    state.bad_steps += 1
    state.counters["skipped_steps"] += 1
    metrics["alarm/non_finite"] = 1
    console.print(f"[red]step {step}: non-finite loss or log-probs; update skipped[/red]")
    if state.bad_steps >= cfg.max_bad_steps:
        raise TrainingStopped(
            f"{state.bad_steps} consecutive non-finite steps (last: step {step}); stopping. "
            f"The last good checkpoint in {run_dir / 'checkpoints'} is intact.")


def _update(cfg, preset, objective_args, model, optimizer, rollout, keep_B, logp_old_BT, logp_ref_BT,
            advantages_BT, step, first_logp_theta_BT=None, prox_fn=None) -> dict[str, Any]:
    """Mini-batch epochs over one step's rollouts; returns averaged metrics and a finiteness flag.

    A mini-batch whose loss or gradient is non-finite is skipped (its gradient is dropped, no
    optimiser step); the step then counts as bad. ``first_logp_theta_BT`` (all rows, with its
    graph, computed at the current weights) stands in for the first micro-batch's forward.
    ``prox_fn(logp_theta_BT, rows) -> logp_old`` (async loop, old_logits=loglinear) makes the
    anchor from each micro-batch's own forward.
    """
    rows = torch.nonzero(keep_B).flatten()
    n_mini = min(cfg.minibatches, len(rows))
    gen = torch.Generator().manual_seed(step_seed(cfg.seed, step, 2))
    metric_sums: dict[str, float] = {}
    n_micro, losses, grad_norms, finite = 0, [], [], True
    for _ in range(cfg.epochs):
        order = rows[torch.randperm(len(rows), generator=gen)]
        for mini in order.chunk(n_mini):
            mask = rollout.loss_mask_BT[mini]
            norm = {"num_tokens": mask.sum().item(), "num_seqs": (mask.sum(-1) > 0).sum().item(),
                    "horizon": cfg.max_new_tokens}
            optimizer.zero_grad(set_to_none=True)
            mini_loss, ok = 0.0, True
            for micro in mini.split(cfg.micro_batch_size or len(mini)):
                sub = rollout.select(micro)
                if first_logp_theta_BT is not None:  # same weights, same rows: reuse that forward
                    logp_theta_BT, first_logp_theta_BT = first_logp_theta_BT[micro], None
                else:
                    logp_theta_BT, _ = setup.token_logprobs(model, sub, cfg)
                old_BT = logp_old_BT[micro] if prox_fn is None else prox_fn(logp_theta_BT, micro)
                inputs = LossInputs(
                    logp_theta_BT=logp_theta_BT, logp_old_BT=old_BT, advantages_BT=advantages_BT[micro],
                    mask_BT=sub.loss_mask_BT, logp_mu_BT=sub.logp_mu_BT, logp_prox_BT=old_BT,
                    logp_ref_BT=None if logp_ref_BT is None else logp_ref_BT[micro], **norm)
                loss, metrics = preset.fn(inputs, **objective_args)
                if cfg.kl_placement is KLPlacement.LOSS:
                    kl_BT = setup.kl_loss_terms(logp_theta_BT, inputs.logp_ref_BT, inputs.mask_BT, cfg)
                    loss = loss + aggregate(kl_BT, inputs.mask_BT, "token-mean", num_tokens=norm["num_tokens"])
                if not torch.isfinite(loss):
                    ok = False
                    break
                loss.backward()
                mini_loss += float(loss.detach())
                for k, v in metrics.items():
                    metric_sums[k] = metric_sums.get(k, 0.0) + float(v)
                n_micro += 1
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)) if ok else math.nan
            if not math.isfinite(grad_norm):
                optimizer.zero_grad(set_to_none=True)
                finite = False
                continue
            optimizer.step()
            losses.append(mini_loss)
            grad_norms.append(grad_norm)
    out: dict[str, Any] = {k: v / max(n_micro, 1) for k, v in metric_sums.items()}
    out["loss"] = sum(losses) / max(len(losses), 1)
    out["grad_norm"] = sum(grad_norms) / max(len(grad_norms), 1)
    out["finite"] = finite
    return out
