"""Calibration-aware on-policy distillation (``caopd``), simplified for the built-in models.

Per prompt the student samples K = ``group_size`` completions; each is verified by the task
(the reward reads the first line), giving the group's empirical success rate ``P_acc``. Every
completion is rewritten as ``<first line>\\nConfidence: {P_acc:.2f}<eos>`` (the body is cut so the whole
fits ``max_new_tokens``): the confidence target is the student's *empirical* success rate, not its
self-report (SalesforceAIResearch/CaOPD ``_generate_and_score_completions``; methods.md §(b)3). The
rewritten rows carry no valid behaviour log-probs (as CaOPD disables TIS for them).

``confidence_label`` (default CaOPD's ``"Confidence: "``) can be shortened for character-level models
(e.g. ``"c"``): twelve new characters take a tiny model many steps to learn.

Deviation from CaOPD: the paper distils (forward KL) from an EMA teacher that reads ``P_acc`` in its
context; a built-in model never saw such a context, so here the target is the rewritten sequence
itself (forward KL to a point mass = NLL; default preset ``sft``). Pass ``--objective`` to change it.
"""

from __future__ import annotations

import re

import torch

from tether.distill.base import Batch, Context, completion_texts, on_policy, sampling
from tether.distill.calibration import (
    empirical_confidence,
    expected_calibration_error,
    overconfidence_gap,
    with_confidence,
)
from tether.distill.data import Row, rows_to_rollout
from tether.rollout import SamplingParams


def stated_confidence(text: str, label: str = "Confidence: ") -> float:
    """The confidence a completion states; 1.0 when it states none (an answer asserted outright)."""
    m = re.search(re.escape(label.strip()) + r"\s*([0-9]*\.?[0-9]+)", text)
    return min(max(float(m.group(1)), 0.0), 1.0) if m else 1.0


class CaOPD:
    needs_teacher = False

    def batch(self, ctx: Context, step: int, seed: int) -> Batch:
        rollout, rows, rewards = on_policy(ctx, seed)
        group = rollout.group_B if rollout.group_B is not None else torch.arange(rollout.batch_size)
        p_acc = empirical_confidence((rewards > 0.5).long(), group)
        tok, limit = ctx.tokenizer, ctx.cfg.max_new_tokens
        new_rows = []
        for i, text in enumerate(completion_texts(rollout, tok)):
            tail = tok.encode(with_confidence("", float(p_acc[i]), label=ctx.cfg.confidence_label))
            body = tok.encode(text.split("\n")[0])[: max(limit - 1 - len(tail), 0)]
            p = int(rollout.prompt_len_B[i])
            new_rows.append(Row(rollout.tokens_BT[i, :p].tolist(), body + tail + [tok.eos_id], None))
        batch_rollout = rows_to_rollout(new_rows, tok.pad_id)
        batch_rollout.group_B = group
        return Batch(batch_rollout, rows)


@torch.no_grad()
def calibration_report(engine, tokenizer, task, cfg) -> dict[str, float]:
    """Greedy held-out accuracy, stated confidence, ECE (10 bins) and overconfidence gap."""
    from tether.tasks.rewards import score

    examples = task.eval_examples()[: cfg.eval_size]
    greedy = SamplingParams(temperature=1.0, top_k=1, max_new_tokens=sampling(cfg).max_new_tokens)
    rollout = engine.generate([tokenizer.encode(ex.prompt) for ex in examples], greedy, seed=0)
    texts = completion_texts(rollout, tokenizer)
    correct = torch.tensor([score(task.reward, ex.prompt, t, ex.answer, timeout_s=cfg.reward_timeout_s).reward > 0.5
                            for ex, t in zip(examples, texts)], dtype=torch.float64)
    conf = torch.tensor([stated_confidence(t, cfg.confidence_label) for t in texts], dtype=torch.float64)
    return {"accuracy": float(correct.mean()), "confidence_mean": float(conf.mean()),
            "ece": float(expected_calibration_error(conf, correct)), "ocg": float(overconfidence_gap(conf, correct))}
