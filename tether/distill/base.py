"""What every distillation algorithm hands the loop: one step's batch and its per-token signals.

An algorithm decides *who samples* (the student on-policy, or the teacher / a dataset off-policy)
and *what it adds to the record* (teacher log-probs, behaviour log-probs, rewards). The loop
(``tether.distill.loop``) never looks at which algorithm it runs: it recomputes the student's
log-probs, builds ``LossInputs`` from the batch's signals and applies the preset.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from tether.engine.base import Engine
from tether.rollout import Rollout, SamplingParams
from tether.tasks.base import Example, Task


@dataclass
class Context:
    cfg: Any
    task: Task
    tokenizer: Any
    student: torch.nn.Module
    student_engine: Engine
    teacher: torch.nn.Module | None = None
    teacher_engine: Engine | None = None


@dataclass
class Batch:
    rollout: Rollout
    """The sequences to train on (student samples, teacher samples or stored rows)."""
    examples: list[Example]
    """One example per row."""
    signals: dict[str, Tensor] = field(default_factory=dict)
    """Extra ``LossInputs`` fields (``logp_teacher_BT``, ``logp_teacher_BTV``, ...), all detached."""
    rewards_B: Tensor | None = None
    """Sequence rewards, turned into advantages by the preset's estimator (None: advantages are 0)."""
    teacher_tokens: int = 0
    """Tokens the teacher generated or scored for this batch (the budget unit)."""


class Algorithm(Protocol):
    needs_teacher: bool

    def batch(self, ctx: Context, step: int, seed: int) -> Batch: ...


def sampling(cfg) -> SamplingParams:
    return SamplingParams(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                          max_new_tokens=cfg.max_new_tokens)


def sample_examples(ctx: Context, seed: int) -> list[Example]:
    rng = random.Random(seed)
    return [ctx.task.sample(rng) for _ in range(ctx.cfg.prompts_per_step)]


def generate(engine, tokenizer, examples: list[Example], cfg, seed: int, n: int) -> tuple[Rollout, list[Example]]:
    """``n`` samples per example from ``engine``; returns the rollout and the example of each row."""
    prompts = [tokenizer.encode(ex.prompt) for ex in examples]
    rollout = engine.generate(prompts, sampling(cfg), seed=seed, n=n)
    return rollout, [ex for ex in examples for _ in range(n)]


def completion_texts(rollout: Rollout, tokenizer) -> list[str]:
    out = []
    for i in range(rollout.batch_size):
        p, n = int(rollout.prompt_len_B[i]), int(rollout.completion_len_B[i])
        ids = rollout.tokens_BT[i, p:p + n].tolist()
        if ids and ids[-1] in tokenizer.eos_ids:
            ids = ids[:-1]
        out.append(tokenizer.decode(ids))
    return out


def task_rewards(ctx: Context, rollout: Rollout, examples: list[Example]) -> Tensor:
    from tether.tasks.rewards import score

    texts = completion_texts(rollout, ctx.tokenizer)
    return torch.tensor([score(ctx.task.reward, ex.prompt, t, ex.answer, timeout_s=ctx.cfg.reward_timeout_s).reward
                         for ex, t in zip(examples, texts)], dtype=torch.float32)


def on_policy(ctx: Context, seed: int) -> tuple[Rollout, list[Example], Tensor]:
    """Student samples ``group_size`` completions per prompt, scored by the task."""
    examples = sample_examples(ctx, seed)
    rollout, rows = generate(ctx.student_engine, ctx.tokenizer, examples, ctx.cfg, seed + 1, ctx.cfg.group_size)
    return rollout, rows, task_rewards(ctx, rollout, rows)
