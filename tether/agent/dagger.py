"""DAgger for multi-turn agents (methods.md §6 (d)1; Ross et al. 2011; "Revisiting DAgger in the Era of
LLM-Agents", arXiv 2605.12913): ``tether train --env E --algorithm dagger``.

Step ``i`` of the run (one DAgger iteration), on the same episode runner and rollout record as RL:

    beta_i = beta_0 * p^i                                    (beta_schedule; annealed towards 0)
    episodes: at every turn k of episode e, the teacher acts with probability beta_i, else the student
              samples (mixture_mask: one seeded draw per (e, k)); the environment executes the chosen action
    labels:   at every visited state s_{e,k} (whoever acted), the teacher's action a*_T(s_{e,k})
    D <- D ∪ {(s_{e,k}, a*_T(s_{e,k}))}                     (Aggregate; label_rows)
    update:   SFT on a sample of D: L = -sum_t log pi_theta(a*_t | s, a*_<t) over the label tokens
              (the ``sft`` preset, token-mean), through the shared update phase

Provenance: the student's turns are ``Source.POLICY`` (policy id 0, the engine's ``log mu``), the teacher's
``Source.TEACHER`` (policy id 1, ``log mu`` = the teacher's own log-probability: 0 for a deterministic
scripted solver), so ``agent/mismatch/policy/...`` reads the engine-vs-trainer mismatch of the student's own
turns and ``agent/mismatch/teacher/...`` how far the student is from the teacher on the turns the teacher
took (``log pi_theta - log mu_teacher``). The SFT rows themselves are single-turn records (prompt: the visited
state's context, completion: the label) with the teacher's ``log mu``; the run's meter (``meter/...``) is
computed on them, so it reads the student-vs-teacher gap on the labels, not an engine mismatch.

The teacher (``--dagger-teacher``): ``scripted`` (:class:`ScriptedTeacher`, the default), the environment's
scripted solver ``expert_action()`` (the one the built-in model's warm start plays), encoded exactly as the warm
start encodes it; or a loaded model acting greedily (:class:`ModelTeacher`): ``builtin`` (the built-in tiny
model warm-started on the environment's expert episodes for ``--dagger-teacher-steps`` steps, seed + 1) or a
Hugging Face model directory sharing the student's tokenizer. The mixture is turn-level (the spec's
``mix_granularity="turn"``); the prefix variant is not implemented.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tether.agent.episodes import EpisodeBatch
from tether.rollout import Rollout, SamplingParams


def beta_schedule(step: int, beta0: float, decay: float) -> float:
    """``beta_i = beta0 * decay^i`` (Ross et al.'s ``beta_i = p^(i-1)`` with ``beta0 = 1`` and ``i`` counted
    from 0): the probability that the teacher acts at a turn of iteration ``i``. ``decay = 1``: constant;
    ``beta0 = 0``: the student alone (pure on-policy labelling)."""
    if step < 0:
        raise ValueError(f"beta_schedule: step must be >= 0, got {step}")
    if not 0.0 <= beta0 <= 1.0:
        raise ValueError(f"beta_schedule: beta0 must be in [0, 1], got {beta0}")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"beta_schedule: decay must be in [0, 1], got {decay}")
    return beta0 * decay ** step


def mixture_mask(beta: float, n_episodes: int, n_turns: int, seed: int) -> Tensor:
    """``M[e, k] = u[e, k] < beta`` with ``u ~ U[0, 1)`` drawn from ``torch.Generator().manual_seed(seed)``:
    True where the teacher acts at turn ``k`` of episode ``e`` (a fixed function of the seed)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n_episodes, n_turns, generator=gen, dtype=torch.float64) < beta


class _Mixture:
    def __init__(self, mask_EK: Tensor | None) -> None:
        self.mask_EK = mask_EK

    def acts(self, e: int, k: int) -> bool:
        """``mask_EK[e, k]`` (False past its last column, or without a mask)."""
        m = self.mask_EK
        return m is not None and k < m.shape[1] and bool(m[e, k])


class ScriptedTeacher(_Mixture):
    """The environment's scripted solver as a policy (``tether.agent.episodes.Teacher``).

    Its label is ``encode_completion(expert_action()) + [EOS]`` of the raw text environment under each ``env``
    (the adapter's ``env``), with log-prob 0 per token (a deterministic policy: ``mu(label) = 1``); it acts where
    ``mask_EK`` says."""

    def __init__(self, tokenizer, mask_EK: Tensor | None = None) -> None:
        super().__init__(mask_EK)
        self.tokenizer = tokenizer

    def label(self, env) -> list[int]:
        raw = getattr(env, "env", env)
        solver = getattr(raw, "expert_action", None)
        if solver is None:
            raise ValueError(f"environment {type(raw).__name__} has no expert_action(): the scripted teacher "
                             "(--algorithm dagger / bepa) needs the environment's solver")
        return self.tokenizer.encode_completion(solver()) + [self.tokenizer.eos_id]

    def labels(self, envs, contexts) -> list[tuple[list[int], list[float]]]:
        out = [self.label(env) for env in envs]
        return [(ids, [0.0] * len(ids)) for ids in out]


class ModelTeacher(_Mixture):
    """A loaded model as the teacher: its greedy action (``top_k = 1``, ``max_new_tokens`` tokens at most) from
    each episode's context, one batched call of its own ``engine`` per turn; the recorded log-probs are the
    engine's under that greedy distribution (0: a deterministic policy). The model must share the student's
    tokenizer (the contexts are the student's tokens)."""

    def __init__(self, engine, max_new_tokens: int, mask_EK: Tensor | None = None) -> None:
        super().__init__(mask_EK)
        self.engine = engine
        self.params = SamplingParams(temperature=1.0, top_k=1, max_new_tokens=max_new_tokens)

    def labels(self, envs, contexts) -> list[tuple[list[int], list[float]]]:
        r = self.engine.generate([list(c) for c in contexts], self.params, seed=0)
        out = []
        for j in range(len(contexts)):
            a = int(r.prompt_len_B[j])
            b = a + int(r.completion_len_B[j])
            out.append((r.tokens_BT[j, a:b].tolist(), r.logp_mu_BT[j, a:b].tolist()))
        return out


@dataclass(frozen=True)
class LabelRow:
    """One aggregated example: the context of a visited state and the teacher's action there."""
    context: tuple[int, ...]
    label: tuple[int, ...]
    label_logp: tuple[float, ...]


def label_rows(batch: EpisodeBatch) -> list[LabelRow]:
    """``{(s_{e,k}, a*_T(s_{e,k}))}`` for every turn that happened: the context is the row's tokens before the
    turn's action (``action_spans[e][k]``), the label ``batch.labels[e][k]``, its behaviour log-probs 0 (every
    teacher here is deterministic: the scripted solver, a greedy model)."""
    if not batch.labels:
        raise ValueError("label_rows: the episodes were run without a teacher (no labels)")
    rows = []
    tokens = batch.rollout.tokens_BT
    for e, spans in enumerate(batch.action_spans):
        for k, (start, _) in enumerate(spans):
            label = batch.labels[e][k]
            rows.append(LabelRow(tuple(tokens[e, :start].tolist()), tuple(label), (0.0,) * len(label)))
    return rows


@dataclass
class Aggregate:
    """DAgger's dataset ``D`` (every label row of every iteration so far)."""
    rows: list[LabelRow] = field(default_factory=list)

    def add(self, new: list[LabelRow]) -> None:
        self.rows.extend(new)

    def sample(self, n: int, seed: int) -> list[LabelRow]:
        """``n`` rows drawn uniformly without replacement (all of ``D`` when it has at most ``n``), in a
        seeded order."""
        idx = list(range(len(self.rows)))
        random.Random(seed).shuffle(idx)
        return [self.rows[i] for i in idx[:n]]

    def state_dict(self) -> dict:
        return {"context": [list(r.context) for r in self.rows], "label": [list(r.label) for r in self.rows],
                "label_logp": [list(r.label_logp) for r in self.rows]}

    def load_state_dict(self, sd: dict) -> None:
        self.rows = [LabelRow(tuple(c), tuple(a), tuple(lp))
                     for c, a, lp in zip(sd["context"], sd["label"], sd["label_logp"])]


def sft_rollout(rows: list[LabelRow], *, pad_id: int, vocab_size: int, version: int,
                params: SamplingParams) -> Rollout:
    """The rows as a single-turn record: prompt = context, completion = label (the loss mask), ``logp_mu`` the
    label's behaviour log-probs, version ``version``; one group per row (the SFT loss reads no advantages)."""
    if not rows:
        raise ValueError("sft_rollout: no rows")
    T = max(len(r.context) + len(r.label) for r in rows)
    B = len(rows)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    logp = torch.zeros(B, T)
    ver = torch.full((B, T), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        c, n = len(r.context), len(r.label)
        tokens[i, :c + n] = torch.tensor(r.context + r.label)
        logp[i, c:c + n] = torch.tensor(r.label_logp, dtype=torch.float32)
        ver[i, c:c + n] = version
    return Rollout(
        tokens_BT=tokens, prompt_len_B=torch.tensor([len(r.context) for r in rows]),
        completion_len_B=torch.tensor([len(r.label) for r in rows]), logp_mu_BT=logp, version_BT=ver,
        kept_count_BT=torch.full((B, T), vocab_size, dtype=torch.long) if params.truncates else None,
        sampling=params, group_B=torch.arange(B), finished_B=torch.ones(B, dtype=torch.bool))
