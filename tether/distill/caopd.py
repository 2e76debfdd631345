"""Calibration-aware on-policy distillation (``caopd``) on the built-in models.

Per prompt the student samples K = ``group_size`` completions; each is verified by the task
(the reward reads the first line), giving the group's empirical success rate ``P_acc``. Every
completion is rewritten as ``<first line>\\n{confidence_label}{P_acc:.2f}<eos>`` (the body is cut so
the whole fits ``max_new_tokens``): the confidence target is the student's *empirical* success
rate, not its self-report (SalesforceAIResearch/CaOPD ``_generate_and_score_completions``;
methods.md §(b)3). The rewritten rows carry no valid behaviour log-probs (as CaOPD disables TIS).

Teacher, as in CaOPD: an EMA of the student's weights (``theta_T <- d theta_T + (1 - d) theta_S``
after every step, ``d = teacher_ema_decay``, default 0.99 = CaOPD's ``ref_model_mixup_alpha``
0.01), and the loss is the forward KL(p_T || p_S) over the full vocabulary at every position of
the rewritten completion (preset ``distill_forward_kl``, CaOPD's ``alpha = 0``). The teacher's
distribution at each position is:

- on the answer (the first line): the EMA teacher's next-token distribution, reading the same
  context as the student. This term holds the answer where the student's own samples put it (the
  EMA trails the student). This module's earlier version had no such term (plain NLL of the
  rewritten sequence) and held-out accuracy fell from 36 % to 3 % in 40 steps; with it, 18 %
  (without the stated-confidence warm start below; docs/distill.md).
- on the confidence suffix (``\\n{label}{P_acc:.2f}<eos>``): a point mass on the target text
  (:func:`point_mass_logprobs`). CaOPD's teacher *reads* ``P_acc`` in its context, told "Output this
  exact value in the 'Confidence:' field", so its distribution there is (for an instruction-following
  LLM) concentrated on those characters; a built-in character model cannot follow that
  instruction, so the point mass stands in for it. Deviation, stated: the teacher's context has
  no privileged text, and CaOPD's ``num_loss_tokens_to_skip = 3`` is not applied (a 1-2 digit
  sum *is* the first 2-3 tokens).

The student must already state a confidence, as CaOPD's prompted LLMs do: :class:`StatedConfidence`
is the task variant whose reference completions are ``<answer>\\n{label}1.00`` (every answer asserted
with full confidence, the habit SFT on correct demonstrations teaches), and the caopd student is
warm-started on it. Teaching the format from scratch inside CaOPD broke the answers instead: the
new suffix's digits and ``.`` leaked into the answer line (measured in docs/distill.md).

``confidence_label`` (default CaOPD's ``"Confidence: "``) can be shortened for character-level models
(e.g. ``"c"``).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from tether.distill.base import Batch, Context, completion_texts, on_policy, sampling
from tether.distill.calibration import (
    brier_score,
    empirical_confidence,
    expected_calibration_error,
    overconfidence_gap,
    with_confidence,
)
from tether.distill.data import Row, rows_to_rollout
from tether.distill.ema import ema_update
from tether.distill.opd import teacher_logprobs, teacher_signals
from tether.rollout import SamplingParams
from tether.tasks.base import Example, Task

POINT_MASS_EPS = 1e-6
"""Mass a point-mass target spreads over the other tokens, so every divergence stays finite."""


def stated_confidence(text: str, label: str = "Confidence: ") -> float:
    """The confidence a completion states; 1.0 when it states none (an answer asserted outright)."""
    m = re.search(re.escape(label.strip()) + r"\s*([0-9]*\.?[0-9]+)", text)
    return min(max(float(m.group(1)), 0.0), 1.0) if m else 1.0


def point_mass_logprobs(tokens_N: Tensor, vocab_size: int, *, eps: float = POINT_MASS_EPS) -> Tensor:
    """``[N, V]`` log-probs of ``(1 - eps)`` on ``tokens_N[n]`` and ``eps / (V - 1)`` on every other token.

    The forward KL to it is ``-(1 - eps) log p_S(y) - eps/(V-1) sum_{v != y} log p_S(v)`` plus a
    constant: the NLL of ``y`` as ``eps -> 0``.
    """
    out = torch.full((tokens_N.numel(), vocab_size), math.log(eps / (vocab_size - 1)))
    out.scatter_(1, tokens_N.reshape(-1, 1), math.log1p(-eps))
    return out


@dataclass(frozen=True)
class StatedConfidenceConfig:
    base: str
    """The wrapped task's name."""
    base_config: object
    """The wrapped task's config (part of the warm-start cache key)."""
    label: str
    """The label before the stated confidence."""


class StatedConfidence:
    """Task variant: the reference completion states the answer, then ``{label}1.00`` on a new line.

    Prompts, held-out split and reward are the wrapped task's (the reward reads the first line, so
    the confidence line does not change it); only the warm-start target gains the confidence line.
    """

    def __init__(self, base: Task, label: str) -> None:
        self.base = base
        self.label = label
        self.name = f"{base.name}+stated-confidence"
        self.config = StatedConfidenceConfig(base.name, getattr(base, "config", None), label)

    def sample(self, rng: random.Random) -> Example:
        ex = self.base.sample(rng)
        return Example(ex.prompt, ex.answer, with_confidence(ex.solution or ex.answer, 1.0, label=self.label))

    def eval_examples(self) -> list[Example]:
        return self.base.eval_examples()

    def reward(self, prompt: str, completion: str, answer: str) -> float:
        return self.base.reward(prompt, completion, answer)


class CaOPD:
    needs_teacher = False  # the teacher is an EMA of the student

    def __init__(self, teacher: torch.nn.Module, ema_decay: float) -> None:
        """``teacher``: a frozen copy of the student (:func:`tether.distill.ema.frozen_copy`)."""
        self.teacher = teacher
        self.ema_decay = ema_decay

    def batch(self, ctx: Context, step: int, seed: int) -> Batch:
        ema_update(self.teacher, ctx.student, decay=self.ema_decay)  # a no-op at step 0 (teacher = student)
        rollout, rows, rewards = on_policy(ctx, seed)
        group = rollout.group_B if rollout.group_B is not None else torch.arange(rollout.batch_size)
        p_acc = empirical_confidence((rewards > 0.5).long(), group)
        tok, limit = ctx.tokenizer, ctx.cfg.max_new_tokens
        new_rows, suffix = [], []
        for i, text in enumerate(completion_texts(rollout, tok)):
            tail = tok.encode(with_confidence("", float(p_acc[i]), label=ctx.cfg.confidence_label)) + [tok.eos_id]
            body = tok.encode(text.split("\n")[0])[: max(limit - len(tail), 0)]
            p = int(rollout.prompt_len_B[i])
            new_rows.append(Row(rollout.tokens_BT[i, :p].tolist(), body + tail, None))
            suffix.append((p + len(body), len(tail)))
        batch_rollout = rows_to_rollout(new_rows, tok.pad_id)
        batch_rollout.group_B = group
        lp_BTV = teacher_logprobs(self.teacher, batch_rollout)
        for i, (start, n) in enumerate(suffix):  # the confidence suffix: the empirical target
            lp_BTV[i, start:start + n] = point_mass_logprobs(batch_rollout.tokens_BT[i, start:start + n],
                                                             lp_BTV.shape[-1])
        return Batch(batch_rollout, rows, teacher_signals(lp_BTV, batch_rollout), rewards_B=rewards)


def _calibration(texts: list[str], examples, task, cfg) -> dict[str, float]:
    from tether.tasks.rewards import score

    correct = torch.tensor([score(task.reward, ex.prompt, t, ex.answer, timeout_s=cfg.reward_timeout_s).reward > 0.5
                            for ex, t in zip(examples, texts)], dtype=torch.float64)
    conf = torch.tensor([stated_confidence(t, cfg.confidence_label) for t in texts], dtype=torch.float64)
    return {"accuracy": float(correct.mean()), "confidence_mean": float(conf.mean()),
            "ece": float(expected_calibration_error(conf, correct)), "ocg": float(overconfidence_gap(conf, correct)),
            "brier": float(brier_score(conf, correct))}


@torch.no_grad()
def calibration_report(engine, tokenizer, task, cfg, *, samples_per_problem: int = 4) -> dict[str, float]:
    """Held-out accuracy, mean stated confidence, ECE (10 bins), overconfidence gap and Brier score.

    Twice: on the greedy completion of each problem (keys as named), and on ``samples_per_problem``
    completions per problem sampled as in training (``temperature`` / ``top_k`` / ``top_p``; keys
    prefixed ``sampled_``). The sampled ones measure what CaOPD's target estimates: ``P_acc`` is the
    success rate of *sampled* completions, and at temperature 1 that is lower than the greedy
    accuracy, so a calibrated sampler looks underconfident on greedy answers.
    """
    examples = task.eval_examples()[: cfg.eval_size]
    prompts = [tokenizer.encode(ex.prompt) for ex in examples]
    greedy = SamplingParams(temperature=1.0, top_k=1, max_new_tokens=sampling(cfg).max_new_tokens)
    out = _calibration(completion_texts(engine.generate(prompts, greedy, seed=0), tokenizer), examples, task, cfg)
    sampled = engine.generate(prompts, sampling(cfg), seed=0, n=samples_per_problem)
    rows = [ex for ex in examples for _ in range(samples_per_problem)]
    out.update({f"sampled_{k}": v for k, v in
                _calibration(completion_texts(sampled, tokenizer), rows, task, cfg).items()})
    return out
