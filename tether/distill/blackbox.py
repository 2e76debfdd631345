"""Black-box distillation: only the teacher's sampled *text* is available (no log-probs, any tokenizer).

Per prompt the teacher writes ``teacher_samples`` completions; each student completion gets the
sequence-level reward ``R = max_j sim(student, teacher_j)`` with
``sim(a, b) = 1 - levenshtein(a, b) / max(|a|, |b|, 1)`` (characters), and the preset (``grpo`` by
default) turns the rewards into group advantages. The task reward is not used: the teacher is the
only signal, as in black-box distillation (OPD survey taxonomy: outcome feedback, black-box access).
"""

from __future__ import annotations

import torch

from tether.distill.base import Batch, Context, completion_texts, generate, sample_examples


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of characters)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        cur = [i]
        for j, cb in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def similarity(a: str, b: str) -> float:
    return 1.0 - levenshtein(a, b) / max(len(a), len(b), 1)


class BlackBox:
    needs_teacher = True

    def batch(self, ctx: Context, step: int, seed: int) -> Batch:
        cfg = ctx.cfg
        examples = sample_examples(ctx, seed)
        with torch.no_grad():
            t_roll, _ = generate(ctx.teacher_engine, ctx.tokenizer, examples, cfg, seed + 2, cfg.teacher_samples)
        refs = completion_texts(t_roll, ctx.tokenizer)
        rollout, rows = generate(ctx.student_engine, ctx.tokenizer, examples, cfg, seed + 1, cfg.group_size)
        texts = completion_texts(rollout, ctx.tokenizer)
        k = cfg.teacher_samples
        rewards = [max(similarity(t, r) for r in refs[(i // cfg.group_size) * k:(i // cfg.group_size + 1) * k])
                   for i, t in enumerate(texts)]
        return Batch(rollout, rows, rewards_B=torch.tensor(rewards), teacher_tokens=int(t_roll.completion_len_B.sum()))

