"""On-policy distillation (``opd``) and on-policy self-distillation (``opsd``).

Both sample from the student and add the teacher's log-probabilities at every student prefix:
``logp_teacher_BTV`` (the full distribution, for full / top-k divergences) and ``logp_teacher_BT``
(its value at the sampled token, for the sampled-token "advantage" form). Task rewards ride along
so a preset can mix in RL (``rl_coef``).

- ``opd``: the teacher is a separate causal LM sharing the student's tokenizer (methods.md §(b)1).
- ``opsd``: the teacher is the student's *initial* weights (siyan-zhao/OPSD ``fixed_teacher``, the
  default) or, with ``opsd_teacher = ema``, an EMA of the student's weights (``use_ema_teacher``,
  decay ``teacher_ema_decay``, default 0.999; :mod:`tether.distill.ema`), conditioned on
  privileged context, ``opsd_template`` with the reference solution, while the student sees the
  question only (methods.md §(b)2). The teacher's row is the privileged prompt followed by the
  student's completion; its log-probs are moved back onto the student's positions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tether.distill.base import Batch, Context, on_policy
from tether.distill.ema import ema_update
from tether.distill.models import vocab_logprobs
from tether.rollout import Rollout


@torch.no_grad()
def teacher_logprobs(teacher: torch.nn.Module, rollout: Rollout, teacher_prompts: list[list[int]] | None = None,
                     *, pad_id: int = 0) -> Tensor:
    """Teacher log-probs ``[B, T, V]`` on the student's completion positions (0 elsewhere).

    With ``teacher_prompts`` the teacher reads ``teacher_prompts[b] + completion[b]`` instead of the
    student's row; completion token ``j`` of row ``b`` sits at student position ``p_s + j`` and at
    teacher position ``p_T + j``.
    """
    mask_BT = rollout.loss_mask_BT
    if teacher_prompts is None:
        lp = vocab_logprobs(teacher, rollout.tokens_BT, rollout.attention_mask_BT)
        return torch.where(mask_BT[..., None], lp, torch.zeros_like(lp))
    B, T = rollout.tokens_BT.shape
    p_s, n = rollout.prompt_len_B, rollout.completion_len_B
    p_t = torch.tensor([len(p) for p in teacher_prompts])
    width = int((p_t + n).max())
    tokens = torch.full((B, width), pad_id, dtype=torch.long)
    for b in range(B):
        comp = rollout.tokens_BT[b, int(p_s[b]):int(p_s[b] + n[b])]
        tokens[b, :int(p_t[b] + n[b])] = torch.cat([torch.tensor(teacher_prompts[b], dtype=torch.long), comp])
    attn = torch.arange(width)[None, :] < (p_t + n)[:, None]
    lp_t = vocab_logprobs(teacher, tokens, attn)
    # student position t -> teacher position t - p_s + p_t (clamped; masked off the completion)
    src_BT = (torch.arange(T)[None, :] - p_s[:, None] + p_t[:, None]).clamp(0, width - 1)
    lp = lp_t.gather(1, src_BT[..., None].expand(B, T, lp_t.shape[-1]))
    return torch.where(mask_BT[..., None], lp, torch.zeros_like(lp))


def teacher_signals(logp_teacher_BTV: Tensor, rollout: Rollout) -> dict[str, Tensor]:
    tok = rollout.tokens_BT[..., None]
    return {"logp_teacher_BTV": logp_teacher_BTV, "logp_teacher_BT": logp_teacher_BTV.gather(-1, tok)[..., 0]}


class OPD:
    needs_teacher = True

    def batch(self, ctx: Context, step: int, seed: int) -> Batch:
        rollout, rows, rewards = on_policy(ctx, seed)
        lp = teacher_logprobs(ctx.teacher, rollout)
        return Batch(rollout, rows, teacher_signals(lp, rollout), rewards, int(rollout.completion_len_B.sum()))


class OPSD:
    needs_teacher = False  # the teacher is a frozen copy of the student

    def __init__(self, initial_student: torch.nn.Module, ema_decay: float | None = None) -> None:
        """``initial_student``: a frozen copy of the student (:func:`tether.distill.ema.frozen_copy`);
        ``ema_decay``: None keeps it fixed, else it trails the student by this EMA decay."""
        self.teacher = initial_student
        self.ema_decay = ema_decay

    def batch(self, ctx: Context, step: int, seed: int) -> Batch:
        if self.ema_decay is not None:  # the student as of the last optimiser step (a no-op at step 0)
            ema_update(self.teacher, ctx.student, decay=self.ema_decay)
        rollout, rows, rewards = on_policy(ctx, seed)
        template = ctx.cfg.opsd_template
        prompts = [ctx.tokenizer.encode(template.format(prompt=ex.prompt, solution=ex.solution or ex.answer))
                   for ex in rows]
        lp = teacher_logprobs(self.teacher, rollout, prompts, pad_id=ctx.tokenizer.pad_id)
        return Batch(rollout, rows, teacher_signals(lp, rollout), rewards, int(rollout.completion_len_B.sum()))
