"""Off-policy supervised distillation: ``sft`` and ``pear`` on teacher samples or stored rows.

Each step either samples ``prompts_per_step x group_size`` completions from the teacher (their
engine log-probs are the behaviour log-probs ``log pi_beta``; ``save_data`` appends them to a
JSONL file) or takes the next rows of ``data`` (validated by :func:`tether.distill.data.load_rows`).
The ``pear`` preset weights each token by clipped importance ratios ``pi_theta / pi_beta``, which
it reads from ``logp_mu_BT``.
"""

from __future__ import annotations

import random

import torch

from tether.distill.base import Batch, Context, generate, sample_examples
from tether.distill.data import Row, rows_from_rollout, rows_to_rollout, write_rows
from tether.tasks.base import Example


class OffPolicySFT:
    def __init__(self, rows: list[Row] | None) -> None:
        self.rows = rows
        self.needs_teacher = self.rows is None
        self._order: list[int] = []

    def _stored(self, ctx: Context, seed: int) -> Batch:
        n = ctx.cfg.prompts_per_step * ctx.cfg.group_size
        picked = []
        while len(picked) < n:
            if not self._order:
                self._order = list(range(len(self.rows)))
                random.Random(seed).shuffle(self._order)
            picked.append(self.rows[self._order.pop()])
        rollout = rows_to_rollout(picked, ctx.tokenizer.pad_id)
        examples = [Example(prompt=ctx.tokenizer.decode(r.prompt_ids), answer=r.answer or "") for r in picked]
        return Batch(rollout, examples, teacher_tokens=int(rollout.completion_len_B.sum()))

    def batch(self, ctx: Context, step: int, seed: int) -> Batch:
        if self.rows is not None:
            return self._stored(ctx, seed)
        examples = sample_examples(ctx, seed)
        with torch.no_grad():
            rollout, rows = generate(ctx.teacher_engine, ctx.tokenizer, examples, ctx.cfg, seed + 1,
                                     ctx.cfg.group_size)
        if ctx.cfg.save_data:
            write_rows(ctx.cfg.save_data, rows_from_rollout(rollout, ctx.tokenizer, [ex.answer for ex in rows]))
        return Batch(rollout, rows, teacher_tokens=int(rollout.completion_len_B.sum()))
