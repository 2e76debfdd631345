"""BEPA, Bi-level Expert-to-Policy Assimilation (methods.md §6 (d)4; arXiv 2601.05787): ``tether train --env E
--algorithm bepa``, GRPO on episodes with a per-task trajectory cache.

Per step, after the ``group_size`` episodes of every task (an episode seed) are played:

    refresh:  for every group with a success, cache[task] <- its first successful episode (the policy's own
              success; replaces any older entry: the "dynamically updated" cache)
    inject:   for every group whose episodes all fail (all_fail_groups), with cache[task] present, the group's
              last episode is replaced by the cached one, which is then the group's only positive
    train:    the run's preset (GRPO by default) on the batch as usual; the injected row's action tokens are
              ``Source.CACHE`` and enter the loss (``Rollout.loss_mask_BT``)

LEVEL-1 (INFERRED reading for tether): the paper abstracts expert traces into plans and keeps the base policy's
successful plan-conditioned rollouts. tether's environments have a scripted solver instead of expert traces, so
a task with no cached trajectory that fails completely is seeded with the solver's own episode
(``ScriptedTeacher`` acting at every turn), kept only if it succeeds; plan conditioning is not implemented.

Importance sampling of the injected row (INFERRED: not documented by the paper; its closest baseline, LUFFY):
the plain on-policy-style ratio ``pi_theta / pi_old`` with ``pi_old`` recomputed on every row, no correction
for who produced it. Its ``log mu`` is kept as recorded (the sampling policy's log-probs for an own success, 0
for the deterministic solver), so ``agent/mismatch/cache/...`` measures the injected turns separately from
``agent/mismatch/policy/...``; ``bepa/injected`` counts the injected rows and ``bepa/cache_size`` the cache.
``agent/success_rate`` is the trained batch's (injected rows included); ``bepa/sampled_success_rate`` the
sampled episodes' alone.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

import torch
from torch import Tensor

from tether.agent.episodes import EpisodeBatch
from tether.rollout import Source


def all_fail_groups(success_E: Tensor, group_E: Tensor) -> Tensor:
    """``F[e] = not any(success[e'] for e' with group[e'] == group[e])``: True on every episode of a group
    with no success."""
    groups = torch.unique(group_E)
    out = torch.zeros_like(success_E, dtype=torch.bool)
    for g in groups:
        rows = group_E == g
        out[rows] = not bool(success_E[rows].any())
    return out


def injection_rows(success_E: Tensor, group_E: Tensor) -> dict[int, int]:
    """``{group id: index of its last episode}`` for every all-fail group (the row a cached trajectory replaces)."""
    fail = all_fail_groups(success_E, group_E)
    out: dict[int, int] = {}
    for e in range(len(group_E)):
        if fail[e]:
            out[int(group_E[e])] = e
    return out


def select_episode(batch: EpisodeBatch, e: int) -> EpisodeBatch:
    """Episode ``e`` of ``batch`` as a one-row batch."""
    idx = torch.tensor([e])
    return EpisodeBatch(
        rollout=batch.rollout.select(idx), rewards_EK=batch.rewards_EK[idx], turn_mask_EK=batch.turn_mask_EK[idx],
        state_EK=batch.state_EK[idx], outcomes=[batch.outcomes[e]], success_E=batch.success_E[idx], failed=0,
        action_spans=[batch.action_spans[e]], messages=[batch.messages[e]] if batch.messages else [],
        labels=[batch.labels[e]] if batch.labels else [])


def _pad(x: Tensor, n: int, fill) -> Tensor:
    return torch.nn.functional.pad(x, (0, n - x.shape[1]), value=fill) if x.shape[1] < n else x


def replace_episode(batch: EpisodeBatch, e: int, row: EpisodeBatch, *, pad_id: int, vocab_size: int) -> EpisodeBatch:
    """``batch`` with episode ``e`` replaced by the one-row ``row`` (its group id kept, its action tokens
    relabelled ``Source.CACHE``, its anchor states given fresh ids); both padded to the longer row and turn
    count with the record's padding conventions."""
    a, b = batch.rollout, row.rollout
    T = max(a.tokens_BT.shape[1], b.tokens_BT.shape[1])
    K = max(batch.rewards_EK.shape[1], row.rewards_EK.shape[1])
    src = b.sources_BT.clone()
    src[(src == Source.POLICY) | (src == Source.TEACHER)] = int(Source.CACHE)

    def put(x: Tensor | None, y: Tensor | None, fill, width: int) -> Tensor | None:
        if x is None or y is None:
            return None
        out = _pad(x, width, fill).clone()
        out[e] = _pad(y, width, fill)[0]
        return out

    def put1(x: Tensor, y: Tensor) -> Tensor:
        out = x.clone()
        out[e] = y[0]
        return out

    rollout = replace(
        a, tokens_BT=put(a.tokens_BT, b.tokens_BT, pad_id, T), prompt_len_B=put1(a.prompt_len_B, b.prompt_len_B),
        completion_len_B=put1(a.completion_len_B, b.completion_len_B), logp_mu_BT=put(a.logp_mu_BT, b.logp_mu_BT, 0.0, T),
        version_BT=put(a.version_BT, b.version_BT, -1, T),
        kept_count_BT=put(a.kept_count_BT, b.kept_count_BT, vocab_size, T),
        finished_B=put1(a.finished_B, b.finished_B), source_BT=put(a.source_BT, src, int(Source.PAD), T),
        turn_BT=put(a.turn_BT, b.turn_BT, -1, T), policy_id_BT=put(a.policy_id_BT, b.policy_id_BT, -1, T))
    fresh = row.state_EK.clone()
    fresh[row.turn_mask_EK] = int(batch.state_EK.max()) + 1 + torch.arange(int(row.turn_mask_EK.sum()))
    messages = list(batch.messages)
    if messages:
        messages[e] = row.messages[0] if row.messages else None
    return replace(
        batch, rollout=rollout, rewards_EK=put(batch.rewards_EK, row.rewards_EK, 0.0, K),
        turn_mask_EK=put(batch.turn_mask_EK, row.turn_mask_EK, False, K), state_EK=put(batch.state_EK, fresh, -1, K),
        outcomes=[*batch.outcomes[:e], row.outcomes[0], *batch.outcomes[e + 1:]],
        success_E=put1(batch.success_E, row.success_E),
        action_spans=[*batch.action_spans[:e], row.action_spans[0], *batch.action_spans[e + 1:]], messages=messages)


class TrajectoryCache:
    """BEPA's per-task cache: task key (the episode seed) -> a one-row successful episode; at most ``size``
    entries, the least recently stored dropped first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: OrderedDict[int, EpisodeBatch] = OrderedDict()

    def put(self, key: int, row: EpisodeBatch) -> None:
        self.entries.pop(key, None)
        self.entries[key] = row
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)

    def get(self, key: int) -> EpisodeBatch | None:
        return self.entries.get(key)

    _ROW = ("tokens_BT", "prompt_len_B", "completion_len_B", "logp_mu_BT", "version_BT", "kept_count_BT",
            "group_B", "finished_B", "source_BT", "turn_BT", "policy_id_BT")

    def state_dict(self) -> dict:
        """The entries as plain data (tensors, lists, strings): what a checkpoint can load without code."""
        def one(row: EpisodeBatch) -> dict:
            r = row.rollout
            return {"rollout": {k: getattr(r, k) for k in self._ROW if getattr(r, k) is not None},
                    "rewards_EK": row.rewards_EK, "turn_mask_EK": row.turn_mask_EK, "state_EK": row.state_EK,
                    "outcomes": list(row.outcomes), "success_E": row.success_E,
                    "action_spans": [[list(sp) for sp in spans] for spans in row.action_spans],
                    "messages": list(row.messages)}

        return {"size": self.size, "keys": list(self.entries), "rows": [one(v) for v in self.entries.values()]}

    def load_state_dict(self, sd: dict, sampling) -> None:
        """The entries of :meth:`state_dict`; ``sampling``: the run's ``SamplingParams`` (not stored)."""
        from tether.rollout import Rollout

        self.entries = OrderedDict()
        for key, d in zip(sd["keys"], sd["rows"]):
            self.entries[int(key)] = EpisodeBatch(
                rollout=Rollout(sampling=sampling, **d["rollout"]), rewards_EK=d["rewards_EK"],
                turn_mask_EK=d["turn_mask_EK"], state_EK=d["state_EK"], outcomes=list(d["outcomes"]),
                success_E=d["success_E"], action_spans=[[tuple(sp) for sp in spans] for spans in d["action_spans"]],
                messages=list(d["messages"]))

    def refresh(self, batch: EpisodeBatch, keys_E: list[int]) -> int:
        """Store the first successful episode of every group (``keys_E[e]``: episode e's task); returns how many."""
        seen: set[int] = set()
        for e in range(len(keys_E)):
            g = int(batch.rollout.group_B[e])
            if g not in seen and bool(batch.success_E[e]):
                seen.add(g)
                self.put(keys_E[e], select_episode(batch, e))
        return len(seen)


def assimilate(batch: EpisodeBatch, keys_E: list[int], cache: TrajectoryCache, seed_fn, *, pad_id: int,
               vocab_size: int) -> tuple[EpisodeBatch, dict[str, float]]:
    """One step of LEVEL-2 (module docstring): refresh the cache with the batch's successes, then inject a cached
    trajectory into every all-fail group. ``seed_fn(key) -> one-row EpisodeBatch | None`` seeds a missing
    entry (LEVEL-1: the scripted solver's episode; kept only when it succeeds)."""
    sampled_success = float(batch.success_E.float().mean())
    refreshed = cache.refresh(batch, keys_E)
    injected = 0
    for e in injection_rows(batch.success_E, batch.rollout.group_B).values():
        row = cache.get(keys_E[e])
        if row is None and seed_fn is not None:
            row = seed_fn(keys_E[e])
            if row is not None and bool(row.success_E[0]):
                cache.put(keys_E[e], row)
            else:
                row = None
        if row is not None:
            batch = replace_episode(batch, e, row, pad_id=pad_id, vocab_size=vocab_size)
            injected += 1
    return batch, {"bepa/sampled_success_rate": sampled_success, "bepa/injected": float(injected), "bepa/refreshed": float(refreshed),
                   "bepa/cache_size": float(len(cache.entries))}
