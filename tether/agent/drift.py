"""The tokenisation-drift meter: how far a re-rendering framework's tokens would be from the sampled ones.

Frameworks that keep a multi-turn episode as messages re-render the history through the chat template at
every turn and train on the re-rendered tokens. When the template is not append-only (Qwen3 strips past
``<think>`` blocks) or the sampled tokens are not the canonical encoding of their text, the trained tokens
differ from the sampled ones and the importance ratio is computed against the wrong context (verl#6719,
rllm PR #272, trl PR #6250). Tether's rows are the sampled tokens (``tether.agent.episodes``), so it has no
such drift; this meter says how much a re-rendering path would have on the same episodes.

Per episode, a :class:`Transcript`: the sampled ``tokens``, the ``[s_k, e_k)`` span of each turn's action,
and the ``messages``; ``render(messages, add_generation_prompt) -> ids`` is the re-rendering. With
``R = render(messages, False)`` and ``C_k = render(messages before the k-th assistant message, True)``:

    agent/retokenize_mismatch_frac   = mean over turns k of [R[:e_k] != tokens[:e_k]]
        (the re-rendered history up to and including action k is not the sampled one)
    agent/retokenize_context_mismatch_frac = mean over turns k of [C_k != tokens[:s_k]]
    agent/retokenize_logp_gap        = mean over turns k of |sum_t log pi(a_k,t | tokens[:s_k], a_k,<t)
                                                            - sum_t log pi(a_k,t | C_k, a_k,<t)|
        a_k = tokens[s_k:e_k], the sampled action; a turn with C_k == tokens[:s_k] contributes exactly 0
        (same context, no model call).

Means are over every turn of every transcript in the batch (0 when there is none). With a template that
strips ``<think>`` from every assistant message but the last, an episode of >= 2 turns whose first action
thinks drifts at every turn: turn 0 is stripped in ``R``, and every later prefix contains turn 0, so
``mismatch_frac`` is 1; a one-turn episode keeps its only (last) action and gives 0.

The per-source and per-turn helpers (:func:`mismatch_by_source`, :func:`mismatch_by_turn`) run the meter's
own ``ratio_stats`` on the subset of tokens of one source / one turn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from tether.meter.stats import ratio_stats
from tether.rollout import Rollout, Source

SUBSET_KEYS = ("n_tokens", "abs_logr_mean", "kl_k3", "ess_token", "ess_seq")
"""The ``ratio_stats`` keys reported per source and per turn."""


@dataclass(frozen=True)
class Transcript:
    tokens: list[int]
    """The sampled row's tokens (prompt, actions, replies)."""
    action_spans: list[tuple[int, int]]
    """[start, end) of each turn's sampled action in ``tokens``."""
    messages: list[dict]
    """The conversation (user, assistant, user / tool, ...), as a chat template sees it."""


Render = Callable[[list[dict], bool], list[int]]
LogprobFn = Callable[[list[list[int]], list[list[tuple[int, int]]]], list[Tensor]]


def _assistant_indices(messages: Sequence[dict]) -> list[int]:
    return [i for i, m in enumerate(messages) if m.get("role") == "assistant"]


def _contexts(t: Transcript, render: Render) -> list[list[int]]:
    idx = _assistant_indices(t.messages)
    if len(idx) < len(t.action_spans):
        raise ValueError(f"drift: {len(t.action_spans)} action spans but {len(idx)} assistant messages")
    return [list(render(list(t.messages[:idx[k]]), True)) for k in range(len(t.action_spans))]


def turn_mismatches(t: Transcript, render: Render) -> list[bool]:
    """Per turn k: ``R[:e_k] != tokens[:e_k]`` with ``R = render(messages, False)`` (module docstring)."""
    R = list(render(list(t.messages), False))
    return [R[:e] != list(t.tokens[:e]) for _, e in t.action_spans]


def context_mismatches(t: Transcript, render: Render) -> list[bool]:
    """Per turn k: ``render(messages before assistant turn k, True) != tokens[:s_k]``."""
    return [c != list(t.tokens[:s]) for c, (s, _) in zip(_contexts(t, render), t.action_spans)]


def mismatch_frac(transcripts: Sequence[Transcript], render: Render) -> float:
    """``agent/retokenize_mismatch_frac``: the fraction of all turns whose re-rendered history drifts."""
    flags = [f for t in transcripts for f in turn_mismatches(t, render)]
    return sum(flags) / len(flags) if flags else 0.0


def logp_gaps(transcripts: Sequence[Transcript], render: Render, logprob_fn: LogprobFn) -> list[float]:
    """Per turn (all transcripts, in order): ``|sum log pi(a_k | sampled ctx) - sum log pi(a_k | C_k)|``.

    ``logprob_fn(rows, spans)`` returns, for each row, the log-probs of the tokens inside its spans,
    concatenated in span order (a 1-D tensor). One call scores the sampled rows and the drifted turns'
    re-rendered rows ``C_k + a_k``; turns whose context did not drift get exactly 0."""
    rows, spans, jobs = [], [], []  # jobs: (turn slot, sampled row index, span position, rerendered row index)
    gaps: list[float] = []
    for t in transcripts:
        ctxs = _contexts(t, render)
        drifted = [(k, c) for k, (c, (s, _)) in enumerate(zip(ctxs, t.action_spans)) if c != list(t.tokens[:s])]
        base = len(gaps)
        gaps += [0.0] * len(t.action_spans)
        if not drifted:
            continue
        own = len(rows)
        rows.append(list(t.tokens))
        spans.append([t.action_spans[k] for k, _ in drifted])
        for j, (k, c) in enumerate(drifted):
            s, e = t.action_spans[k]
            jobs.append((base + k, own, j, len(rows)))
            rows.append(c + list(t.tokens[s:e]))
            spans.append([(len(c), len(c) + e - s)])
    if not rows:
        return gaps
    out = logprob_fn(rows, spans)
    for slot, own, j, other in jobs:
        lens = [e - s for s, e in spans[own]]
        sampled = torch.split(out[own], lens)[j].double().sum()
        gaps[slot] = float((sampled - out[other].double().sum()).abs())
    return gaps


def drift_metrics(transcripts: Sequence[Transcript], render: Render, logprob_fn: LogprobFn | None = None
                  ) -> dict[str, float]:
    """``agent/retokenize_*`` of one batch (module docstring); the gap needs ``logprob_fn``."""
    ctx = [f for t in transcripts for f in context_mismatches(t, render)]
    out = {"agent/retokenize_mismatch_frac": mismatch_frac(transcripts, render),
           "agent/retokenize_context_mismatch_frac": sum(ctx) / len(ctx) if ctx else 0.0,
           "agent/retokenize_turns": float(len(ctx))}
    if logprob_fn is not None:
        gaps = logp_gaps(transcripts, render, logprob_fn)
        out["agent/retokenize_logp_gap"] = sum(gaps) / len(gaps) if gaps else 0.0
        out["agent/retokenize_logp_gap_max"] = max(gaps, default=0.0)
    return out


def transcripts(batch) -> list[Transcript]:
    """The transcripts of an ``EpisodeBatch`` whose environments kept their messages (others are skipped)."""
    r = batch.rollout
    total = (r.prompt_len_B + r.completion_len_B).tolist()
    return [Transcript(r.tokens_BT[i, :total[i]].tolist(), list(batch.action_spans[i]), list(m))
            for i, m in enumerate(batch.messages) if m]


def model_logprob_fn(model: torch.nn.Module, pad_id: int) -> LogprobFn:
    """A ``logprob_fn`` from a causal LM (the built-in model or a ``transformers`` one): right-padded
    batch, full-vocabulary log-softmax at temperature 1, no gradient."""
    from tether.models.logprobs import sequence_logits

    def fn(rows: list[list[int]], spans: list[list[tuple[int, int]]]) -> list[Tensor]:
        T = max(len(x) for x in rows)
        dev = next(model.parameters()).device
        tok = torch.full((len(rows), T), pad_id, dtype=torch.long, device=dev)
        att = torch.zeros(len(rows), T, dtype=torch.bool, device=dev)
        for i, x in enumerate(rows):
            tok[i, :len(x)] = torch.tensor(x, device=dev)
            att[i, :len(x)] = True
        with torch.no_grad():
            lp = torch.log_softmax(sequence_logits(model, tok, att).double(), dim=-1)
        out = []
        for i, sp in enumerate(spans):
            pos = torch.tensor([p for s, e in sp for p in range(s, e)], dtype=torch.long, device=dev)
            out.append(lp[i, pos - 1].gather(-1, tok[i, pos][:, None])[:, 0] if len(pos) else lp.new_zeros(0))
        return out

    return fn


def _subset(log_ratio_BT: Tensor, mask_BT: Tensor, prefix: str) -> dict[str, Tensor]:
    stats = ratio_stats(log_ratio_BT, mask_BT, prefix=prefix)
    return {f"{prefix}/{k}": stats[f"{prefix}/{k}"] for k in SUBSET_KEYS}


def mismatch_by_source(rollout: Rollout, logp_BT: Tensor, logp_mu_BT: Tensor,
                       sources: Sequence[Source] = (Source.POLICY, Source.TEACHER, Source.CACHE)) -> dict[str, Tensor]:
    """``agent/mismatch/<source>/{n_tokens, abs_logr_mean, kl_k3, ess_token, ess_seq}``: the meter's
    ``ratio_stats`` of ``z = logp_BT - logp_mu_BT`` (trainer vs behaviour) on the tokens of each source.
    Sources without behaviour log-probs (prompt, env, tool) are not listed by default; an absent source
    gives the neutral values (n_tokens 0, ESS 1)."""
    z = logp_BT - logp_mu_BT
    src = rollout.sources_BT.to(z.device)
    out: dict[str, Tensor] = {}
    for s in sources:
        out.update(_subset(z, src == int(s), f"agent/mismatch/{Source(s).name.lower()}"))
    return out


def mismatch_by_turn(rollout: Rollout, logp_BT: Tensor, logp_mu_BT: Tensor, *, max_turns: int | None = None
                     ) -> dict[str, Tensor]:
    """``agent/turn<k>/{...}`` (the keys of :func:`mismatch_by_source`) on the policy tokens of turn k,
    k = 0 .. max_turns - 1 (default: the largest turn index in the batch + 1; one host sync): the tokens the
    policy sampled in this batch (``Source.POLICY``; BEPA's replayed ``CACHE`` turns have their own source entry)."""
    z = logp_BT - logp_mu_BT
    mask = (rollout.sources_BT == Source.POLICY).to(z.device)
    turn = rollout.turn_BT if rollout.turn_BT is not None else torch.where(rollout.loss_mask_BT, 0, -1)
    turn = turn.to(z.device)
    K = max_turns if max_turns is not None else int(turn.max()) + 1
    out: dict[str, Tensor] = {}
    for k in range(K):
        out.update(_subset(z, mask & (turn == k), f"agent/turn{k}"))
    return out
