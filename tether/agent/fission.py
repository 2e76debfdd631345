"""Fission-GRPO (methods.md §6 (d)5, arXiv 2601.15625) [INFERRED: the code is not released]: fork a failed
episode at its failing step and sample ``G'`` continuations from that state as a new GRPO group; the step
trains on the original groups and the forked ones together.

The reading implemented here (each point a choice where the paper's text is not available):

* **which episodes**: in every group, the first episode (in row order) that did not succeed and did not end on an
  environment error; one fork per group, so a step adds at most ``prompts_per_step * G'`` episodes.
* **the failing step** ``k*``: the first turn whose step marks failure (``tether.agent.episodes.marks_failure``: a
  negative reward, ``info["invalid"]`` or ``info["error"]``; the calculator's tool errors, unreadable actions);
  an outcome-only failure (no marked step) fails at its last turn.
* **the fork state**: the paper truncates at the erroneous tool call and appends diagnostic feedback from an
  Error Simulator model, then samples recovery rollouts. Here the environment's own reply to the failing step is
  the feedback: when the episode went on after ``k*``, the fork replays turns ``0..k*`` (the error and its reply)
  and the continuations start at turn ``k* + 1``; when ``k*`` ended the episode (a wrong final answer, a hole),
  there is no reply to recover from, so the fork replays turns ``0..k*-1`` and resamples turn ``k*``.
* **restoring the state**: ``reset(seed)`` and replay the prefix actions (``run_episodes(replays=...)``); the
  replayed tokens must equal the failed row's prefix, token for token (else an error: the environment is not
  deterministic under its seed). Replayed action tokens are ``Source.REPLAY`` (their original ``log mu`` and
  versions kept, never in the loss); the continuations are ``Source.POLICY``.
* **advantages**: each forked group is a group of its own (group-relative within it, the same clipped loss and
  credit as the run's); the rows are marked ``EpisodeBatch.fission_B``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from tether.agent.episodes import EpisodeBatch, Replay
from tether.rollout import concat_rows

FISSION_CHUNK = 500
"""Continuations are sampled with ``seed_fn(k, FISSION_CHUNK + c)``: seeds apart from the batch's own chunks."""


@dataclass(frozen=True)
class Fork:
    """One failed episode to fork: its row, its failing turn and how many of its turns the fork replays."""
    row: int
    failing_turn: int
    replayed: int


def fork_point(failure_K: Sequence[bool], n_turns: int) -> tuple[int, int]:
    """``(k*, P)`` of an episode of ``n_turns`` turns (module docstring): the failing turn and the turns replayed."""
    if n_turns < 1:
        raise ValueError(f"fork_point: an episode has at least one turn, got {n_turns}")
    marked = [k for k in range(n_turns) if failure_K[k]]
    k = marked[0] if marked else n_turns - 1
    return k, (k + 1 if k < n_turns - 1 else k)


def choose_forks(batch: EpisodeBatch) -> list[Fork]:
    """The episode forked in each group (module docstring), in group order."""
    forks, seen = [], set()
    n_E = batch.turn_mask_EK.sum(dim=1).tolist()
    for e, g in enumerate(batch.rollout.group_B.tolist()):
        if g in seen or bool(batch.success_E[e]) or batch.outcomes[e] == "env_error":
            continue
        seen.add(g)
        marks = batch.failure_EK[e].tolist() if batch.failure_EK is not None else [False] * int(n_E[e])
        k, p = fork_point(marks, int(n_E[e]))
        forks.append(Fork(e, k, p))
    return forks


def replay_of(batch: EpisodeBatch, fork: Fork) -> Replay:
    """The first ``fork.replayed`` turns of the failed row as a :class:`Replay`: actions, their ``log mu``,
    versions and kept counts, and the row's tokens up to the start of the next action."""
    r, e, p = batch.rollout, fork.row, fork.replayed
    spans = batch.action_spans[e]
    end = spans[p][0] if p < len(spans) else int(r.attention_mask_BT[e].sum())
    tokens = r.tokens_BT[e].tolist()

    def cut(x):
        return [x[e, a:b].tolist() for a, b in spans[:p]]

    return Replay(actions=[tokens[a:b] for a, b in spans[:p]], logp=cut(r.logp_mu_BT), versions=cut(r.version_BT),
                  kept=cut(r.kept_count_BT) if r.kept_count_BT is not None else None, tokens=tokens[:end])


def _pad_cat(a: torch.Tensor, b: torch.Tensor, fill) -> torch.Tensor:
    K = max(a.shape[1], b.shape[1])
    pad = torch.nn.functional.pad
    return torch.cat([pad(a, (0, K - a.shape[1]), value=fill), pad(b, (0, K - b.shape[1]), value=fill)])


def merge(base: EpisodeBatch, forked: EpisodeBatch, *, pad_id: int, vocab_size: int) -> EpisodeBatch:
    """``base`` then ``forked`` as one batch: the forked groups get ids after the base's, their anchor-state ids
    are shifted past the base's, and ``fission_B`` marks the forked rows."""
    state_offset = int(base.state_EK.max()) + 1 if base.state_EK.numel() else 0
    forked_state = torch.where(forked.state_EK >= 0, forked.state_EK + state_offset, forked.state_EK)
    fission_B = torch.cat([torch.zeros(base.rollout.batch_size, dtype=torch.bool),
                           torch.ones(forked.rollout.batch_size, dtype=torch.bool)])
    return replace(
        base,
        rollout=concat_rows([base.rollout, forked.rollout], pad_id=pad_id, vocab_size=vocab_size),
        rewards_EK=_pad_cat(base.rewards_EK, forked.rewards_EK, 0.0),
        turn_mask_EK=_pad_cat(base.turn_mask_EK, forked.turn_mask_EK, False),
        state_EK=_pad_cat(base.state_EK, forked_state, -1),
        outcomes=base.outcomes + forked.outcomes,
        success_E=torch.cat([base.success_E, forked.success_E]),
        failed=base.failed + forked.failed,
        action_spans=base.action_spans + forked.action_spans,
        messages=base.messages + forked.messages,
        failure_EK=_pad_cat(base.failure_EK, forked.failure_EK, False),
        replayed_EK=_pad_cat(base.replayed_EK, forked.replayed_EK, False),
        fission_B=fission_B,
    )


def fission(batch: EpisodeBatch, seeds: Sequence[int], copies: int,
            run: Callable[[list[int], list[Replay], torch.Tensor], EpisodeBatch], *, pad_id: int,
            vocab_size: int) -> EpisodeBatch:
    """``batch`` plus one forked group of ``copies`` episodes per chosen failed episode (module docstring).

    ``seeds[e]``: the seed episode ``e`` was reset with. ``run(seeds, replays, group_B)`` plays the continuations
    (``run_episodes`` with the run's engine and settings). No failed episode: ``batch`` with ``fission_B`` all
    False."""
    forks = choose_forks(batch)
    if not forks:
        return replace(batch, fission_B=torch.zeros(batch.rollout.batch_size, dtype=torch.bool))
    fork_seeds = [int(seeds[f.row]) for f in forks for _ in range(copies)]
    replays = [replay_of(batch, f) for f in forks for _ in range(copies)]
    forked = run(fork_seeds, replays, torch.arange(len(forks)).repeat_interleave(copies))
    return merge(batch, forked, pad_id=pad_id, vocab_size=vocab_size)
