"""The distillation loop, top to bottom (one loop per execution mode; this one for teacher -> student).

    algorithm.batch (who samples; teacher / behaviour log-probs; rewards) -> advantages
    -> recompute the student's pi_old -> preset loss on LossInputs -> optimiser -> weights to the engine

Like ``tether.train.sync`` it is algorithm-blind: the algorithm fills the record, the preset
combines it. It differs in what it recomputes: the student's full next-token distribution
``logp_theta_BTV`` (with gradient) when the preset needs it, for full-vocabulary and top-k
divergences. It stops after ``steps`` optimiser steps or once ``teacher_token_budget`` teacher
tokens were spent, whichever comes first.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import torch

from tether.configs import to_dict
from tether.distill.base import Context
from tether.distill.config import Algorithm, DistillConfig
from tether.distill.models import (
    build_student,
    build_teacher,
    check_shared_vocab,
    teacher_vocab_size,
    vocab_logprobs,
)
from tether.objectives import LossInputs, get_preset
from tether.objectives.advantages import get_advantage
from tether.train.metrics_log import MetricsLog
from tether.train.progress import Reporter
from tether.train.seeds import step_seed

DISTILL_SALT = 17
"""The salt of a distillation step's one draw (``tether.train.seeds.step_seed``)."""


def make_algorithm(cfg: DistillConfig, tokenizer, student: torch.nn.Module, rows=None):
    from tether.distill.blackbox import BlackBox
    from tether.distill.caopd import CaOPD
    from tether.distill.ema import frozen_copy
    from tether.distill.opd import OPD, OPSD
    from tether.distill.rl import RL
    from tether.distill.sft import OffPolicySFT

    if cfg.algorithm is Algorithm.OPD:
        return OPD()
    if cfg.algorithm is Algorithm.OPSD:
        return OPSD(frozen_copy(student), cfg.ema_decay)
    if cfg.algorithm in (Algorithm.SFT, Algorithm.PEAR):
        return OffPolicySFT(rows)
    if cfg.algorithm is Algorithm.BLACKBOX:
        return BlackBox()
    if cfg.algorithm is Algorithm.CAOPD:
        return CaOPD(frozen_copy(student), cfg.ema_decay)
    return RL()


def evaluate(model, tokenizer, task, cfg) -> float:
    from tether.engine.torch_engine import TorchEngine
    from tether.train.config import TrainConfig
    from tether.train.scoring import Scorer
    from tether.train.setup import Policy
    from tether.train.setup import evaluate as greedy_accuracy

    engine = TorchEngine(copy.deepcopy(model), eos_id=tokenizer.eos_ids, pad_id=tokenizer.pad_id)
    # the distillation loop scores in its own process, under the reward timeout (no worker pool yet)
    scoring = TrainConfig.from_flat(reward_timeout_s=cfg.reward_timeout_s, reward_workers=0, eval_size=cfg.eval_size,
                                    max_new_tokens=cfg.max_new_tokens)
    with Scorer(task, scoring, {}) as scorer:
        return greedy_accuracy(Policy(model, tokenizer, engine), scorer, cfg)


def distill(cfg: DistillConfig) -> dict[str, Any]:
    from tether.engine.torch_engine import TorchEngine
    from tether.models.tokenizer import CharTokenizer
    from tether.tasks.registry import get_task

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    preset = get_preset(cfg.preset_name)
    args = preset.resolve(cfg.objective_args)  # validate before any compute
    advantage_fn = get_advantage(preset.advantage)
    needs_vocab = {"logp_theta_BTV", "logp_teacher_BTV"} & set(preset.requires)
    vocab = CharTokenizer().vocab_size
    uses_teacher = cfg.algorithm in (Algorithm.OPD, Algorithm.BLACKBOX) or (
        cfg.algorithm in (Algorithm.SFT, Algorithm.PEAR) and cfg.data is None)
    if uses_teacher:  # the teacher samples or scores the student's token ids: check before any weights exist
        check_shared_vocab(teacher_vocab_size(cfg, vocab), vocab)
    rows = None
    if cfg.data is not None:  # validate stored rows before any weights are built
        from tether.distill.data import load_rows

        rows = load_rows(cfg.data, CharTokenizer(), need_behaviour=cfg.algorithm is Algorithm.PEAR)
    task = get_task(cfg.task, reward=cfg.reward,
                    **(cfg.task_options if cfg.task_options is not None else
                       ({"max_digits": 2, "ops": "+"} if cfg.task == "arithmetic" else {})))
    run_dir = Path(cfg.out or f"runs/distill-{cfg.algorithm.value}-{cfg.seed}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    reporter = Reporter.for_run(cfg, run_dir)

    if cfg.algorithm is Algorithm.CAOPD:  # the student states a confidence before CaOPD calibrates it
        from tether.distill.caopd import StatedConfidence

        task = StatedConfidence(task, cfg.confidence_label)
    model, tokenizer = build_student(cfg, task, reporter)
    if cfg.init is not None:
        model.load_state_dict(torch.load(cfg.init, map_location="cpu", weights_only=True))
    algo = make_algorithm(cfg, tokenizer, model, rows)
    teacher = build_teacher(cfg, task, vocab, reporter) if algo.needs_teacher else None
    ctx = Context(cfg, task, tokenizer, model, TorchEngine(copy.deepcopy(model), eos_id=tokenizer.eos_ids,
                                                           pad_id=tokenizer.pad_id))
    if teacher is not None:
        ctx.teacher = teacher
        ctx.teacher_engine = TorchEngine(copy.deepcopy(teacher), eos_id=tokenizer.eos_ids, pad_id=tokenizer.pad_id)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / max(cfg.warmup_steps, 1)))
    teacher_accuracy = evaluate(teacher, tokenizer, task, cfg) if teacher is not None else None
    accuracy_before = evaluate(model, tokenizer, task, cfg)
    reporter.note(f"eval before distillation: student accuracy {accuracy_before:.1%}"
                  + (f", teacher {teacher_accuracy:.1%}" if teacher_accuracy is not None else ""))
    calibration = _calibration(cfg, ctx, task)

    log = MetricsLog(run_dir / "metrics.jsonl")
    t0, teacher_tokens, step = time.perf_counter(), 0, 0
    with reporter.phase(f"distill/{cfg.algorithm.value}", cfg.steps) as bar:
        while step < cfg.steps and (cfg.teacher_token_budget is None or teacher_tokens < cfg.teacher_token_budget):
            batch = algo.batch(ctx, step, step_seed(cfg.seed, step, DISTILL_SALT))
            teacher_tokens += batch.teacher_tokens
            metrics = _update(cfg, preset, args, advantage_fn, model, optimizer, batch, needs_vocab)
            scheduler.step()
            model.eval()
            ctx.student_engine.load_weights(model.state_dict(), version=step + 1)
            metrics.update({"step": step, "teacher_tokens": teacher_tokens,
                            "length/mean": float(batch.rollout.completion_len_B.float().mean())})
            if batch.rewards_B is not None:
                metrics["reward/mean"] = float(batch.rewards_B.mean())
            log.write(metrics)
            bar.advance(metrics)
            step += 1
    torch.save(model.state_dict(), run_dir / "student.pt")
    accuracy_after = evaluate(model, tokenizer, task, cfg)
    reporter.note(f"eval after distillation: student accuracy {accuracy_after:.1%}")
    summary = {
        "run_dir": str(run_dir), "algorithm": cfg.algorithm.value, "objective": cfg.preset_name, "steps": step,
        "teacher_tokens": teacher_tokens, "eval/teacher_accuracy": teacher_accuracy,
        "eval/accuracy_before": accuracy_before, "eval/accuracy_after": accuracy_after,
        "time/total_s": time.perf_counter() - t0,
        "student_params": sum(p.numel() for p in model.parameters()),
        "teacher_params": None if teacher is None else sum(p.numel() for p in teacher.parameters()),
    }
    if calibration is not None:
        after = _calibration(cfg, ctx, task)
        summary.update({f"calibration/{k}_before": v for k, v in calibration.items()})
        summary.update({f"calibration/{k}_after": v for k, v in after.items()})
    for engine in (ctx.student_engine, ctx.teacher_engine):  # the Engine protocol: released at the end of the run
        if engine is not None:
            engine.close()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _calibration(cfg, ctx, task) -> dict[str, float] | None:
    """ECE etc. of the student's stated confidences (caopd only)."""
    if cfg.algorithm is not Algorithm.CAOPD:
        return None
    from tether.distill.caopd import calibration_report

    return calibration_report(ctx.student_engine, ctx.tokenizer, task, cfg)


def _update(cfg, preset, args, advantage_fn, model, optimizer, batch, needs_vocab) -> dict[str, Any]:
    """One optimiser step on the batch (pi_old = the student before the step, so ratios start at 1)."""
    rollout = batch.rollout
    mask_BT = rollout.loss_mask_BT
    tok = rollout.tokens_BT[..., None]
    with torch.no_grad():
        logp_old_BT = vocab_logprobs(model, rollout.tokens_BT, rollout.attention_mask_BT,
                                     temperature=cfg.temperature).gather(-1, tok)[..., 0]
    logp_old_BT = torch.where(mask_BT, logp_old_BT, 0.0)
    if batch.rewards_B is not None:
        group_B = rollout.group_B if rollout.group_B is not None else torch.arange(rollout.batch_size)
        advantages_BT = advantage_fn(batch.rewards_B, group_B)[:, None].float() * mask_BT
    else:
        advantages_BT = torch.zeros_like(logp_old_BT)
    model.train()
    logp_BTV = vocab_logprobs(model, rollout.tokens_BT, rollout.attention_mask_BT, temperature=cfg.temperature)
    logp_theta_BT = torch.where(mask_BT, logp_BTV.gather(-1, tok)[..., 0], 0.0)
    inputs = LossInputs(logp_theta_BT=logp_theta_BT, logp_old_BT=logp_old_BT, advantages_BT=advantages_BT,
                        mask_BT=mask_BT, logp_mu_BT=rollout.logp_mu_BT, logp_prox_BT=logp_old_BT,
                        logp_theta_BTV=logp_BTV if needs_vocab else None, **batch.signals)
    inputs.require(*preset.requires, preset=preset.name)
    loss, metrics = preset.fn(inputs, **args)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    out = {k: float(v) for k, v in metrics.items()}
    if torch.isfinite(loss) and torch.isfinite(grad_norm):
        optimizer.step()
    else:
        out["alarm/non_finite"] = 1
    out.update({"loss": float(loss.detach()), "grad_norm": float(grad_norm)})
    return out
