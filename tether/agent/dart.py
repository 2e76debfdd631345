"""DART's data-curation switches (methods.md §6 (d)2; arXiv 2509.23866), over the same rollout record and update.

The decoupled asynchronous rollouts are ``--mode async`` and its truncated IS is the ``tis`` preset (docs/async.md);
this module holds the three switches the curation scheme adds, each off by default:

* **high-entropy step selection** (``--dart-entropy-top F``): the trainer's per-token entropy ``H_t`` (of
  ``pi_theta`` at the step's weights, from the recompute forward that also gives ``pi_old``) is averaged over the
  loss tokens of every agent step (turn) ``k`` of every episode ``e``:

      Hbar_{e,k} = (1 / |S_{e,k}|) sum_{t in S_{e,k}} H_t          S_{e,k}: the loss tokens of turn k of episode e

  and only the ``ceil(F * N)`` steps with the largest ``Hbar`` (``N``: the steps of the batch that have a loss
  token; ties: the earlier episode, then the earlier turn) stay in the loss. The others are taken out of the loss
  mask (their tokens relabelled ``Source.REPLAY``: the policy's own action, context only), so the token-mean
  normaliser counts the kept tokens only. DART's code keeps the top ``entropy_filter`` fraction of its step rows
  in the same way (EXACT-CODE); the rounding (ceil, so at least one step stays) is this module's reading.
* **adaptive rollout counts** (``--dart-adaptive``): the episodes of a step are shared among its tasks (episode
  seeds) by their recent success rate ``p`` (the last ``--dart-window`` episodes of that task): the weight
  ``w = p (1 - p)`` (the variance of a success, largest at 50 %, 0 for a solved or hopeless task; a task with no
  history counts as 50 %), each task at least ``--dart-min-rollouts`` and at most ``--dart-max-rollouts``
  episodes (:func:`allocate_rollouts`). INFERRED: the paper adjusts rollout numbers per task by difficulty
  without stating the rule or its thresholds; here the step's total stays ``prompts_per_step * group_size`` so
  the batch shape (and the mini-batch split) is the same as without the switch. Tasks repeat only when training
  seeds come from a finite pool (``--task-pool N``); with fresh seeds every task is new and the allocation is the
  uniform ``group_size`` each.
* **experience reuse** (``--dart-reuse``): successful trajectories are kept per task and replayed into groups
  where every sampled episode failed: BEPA's LEVEL-2 cache and injection (``tether.agent.bepa.TrajectoryCache``,
  ``assimilate``) with the policy's own successes only (no solver seeding). DART pre-collects successful
  trajectories for hard tasks offline; a run here collects them online, from its own earlier steps.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from tether.rollout import Rollout, Source


def turn_entropy(entropy_BT: Tensor, mask_BT: Tensor, turn_BT: Tensor, n_turns: int) -> tuple[Tensor, Tensor]:
    """``(Hbar_EK, count_EK)``: the mean of ``entropy_BT`` over the ``mask_BT`` tokens of each turn (module
    docstring; 0 where a turn has none) and how many tokens each turn has, float64 and int64, ``[B, n_turns]``."""
    if entropy_BT.shape != mask_BT.shape or turn_BT.shape != mask_BT.shape:
        raise ValueError(f"turn_entropy: entropy {tuple(entropy_BT.shape)}, mask {tuple(mask_BT.shape)} and turns "
                         f"{tuple(turn_BT.shape)} must have one shape")
    m = mask_BT.to(torch.bool) & (turn_BT >= 0) & (turn_BT < n_turns)
    B = mask_BT.shape[0]
    idx = (torch.arange(B, device=m.device)[:, None] * n_turns + turn_BT.clamp(min=0))[m]
    total = torch.zeros(B * n_turns, dtype=torch.float64, device=m.device).index_add_(
        0, idx, entropy_BT.detach().to(torch.float64)[m])
    count = torch.zeros(B * n_turns, dtype=torch.int64, device=m.device).index_add_(
        0, idx, torch.ones_like(idx))
    mean = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
    return mean.view(B, n_turns), count.view(B, n_turns)


def select_high_entropy(mean_EK: Tensor, valid_EK: Tensor, fraction: float) -> Tensor:
    """The kept steps (module docstring): True on the ``ceil(fraction * N)`` valid entries with the largest
    ``mean_EK`` (``N = valid_EK.sum()``), ties to the lower row-major index; False elsewhere."""
    if not 0 < fraction <= 1:
        raise ValueError(f"select_high_entropy: fraction must be in (0, 1], got {fraction}")
    valid = valid_EK.to(torch.bool).reshape(-1)
    n = int(valid.sum())
    keep = torch.zeros_like(valid)
    if n == 0:
        return keep.view(valid_EK.shape)
    k = min(n, max(1, math.ceil(fraction * n - 1e-9)))
    flat = torch.where(valid, mean_EK.reshape(-1).to(torch.float64), torch.full_like(mean_EK.reshape(-1), -math.inf,
                                                                                        dtype=torch.float64))
    order = torch.sort(flat, descending=True, stable=True).indices  # stable: equal values keep index order
    keep[order[:k]] = True
    return keep.view(valid_EK.shape)


def mask_turns(rollout: Rollout, keep_EK: Tensor) -> Rollout:
    """``rollout`` with the loss tokens of every turn ``keep_EK`` leaves out relabelled ``Source.REPLAY`` (out of
    the loss mask, still context); turn ``k`` of row ``e`` is kept where ``keep_EK[e, k]``."""
    if rollout.source_BT is None or rollout.turn_BT is None:
        raise ValueError("mask_turns: the rollout has no provenance (a single-turn record has no agent steps)")
    turn = rollout.turn_BT.clamp(min=0, max=keep_EK.shape[1] - 1)
    kept_BT = keep_EK.to(torch.bool).gather(1, turn)
    drop = rollout.loss_mask_BT & ~kept_BT
    return replace(rollout, source_BT=torch.where(drop, torch.full_like(rollout.source_BT, int(Source.REPLAY)),
                                                  rollout.source_BT))


def entropy_selection(rollout: Rollout, entropy_BT: Tensor, fraction: float) -> tuple[Rollout, dict[str, float]]:
    """The high-entropy step selection of one batch (module docstring): the rollout the update trains on and
    the metrics ``dart/steps``, ``dart/kept_steps``, ``dart/kept_token_frac``, ``dart/kept_entropy_mean``,
    ``dart/dropped_entropy_mean``."""
    mask = rollout.loss_mask_BT
    K = int(rollout.turn_BT.max()) + 1 if rollout.turn_BT is not None and rollout.turn_BT.numel() else 1
    mean_EK, count_EK = turn_entropy(entropy_BT, mask, rollout.turn_BT, max(K, 1))
    valid = count_EK > 0
    keep = select_high_entropy(mean_EK, valid, fraction)
    out = mask_turns(rollout, keep)
    dropped = valid & ~keep

    def avg(sel: Tensor) -> float:
        return float(mean_EK[sel].mean()) if sel.any() else 0.0

    return out, {"dart/steps": float(valid.sum()), "dart/kept_steps": float(keep.sum()),
                 "dart/kept_token_frac": float(out.loss_mask_BT.sum()) / max(int(mask.sum()), 1),
                 "dart/kept_entropy_mean": avg(keep), "dart/dropped_entropy_mean": avg(dropped)}


def allocate_rollouts(rates: Sequence[float | None], total: int, lo: int, hi: int) -> list[int]:
    """Episodes per task (module docstring): every task starts at ``lo``; the remaining ``total - n lo`` are
    handed out one at a time, each to the task with the largest ``w_i / (c_i - lo + 1)`` among those below
    ``hi`` (``c_i``: its count so far; ``w_i = p_i (1 - p_i)``, ``p_i = 0.5`` where ``rates[i]`` is None; ties:
    the lower index), i.e. shares proportional to ``w`` by the highest-averages (D'Hondt) rule. When every
    weight left is 0 (all solved or hopeless) the rest go round-robin to the tasks below ``hi``. Needs
    ``n lo <= total <= n hi``."""
    n = len(rates)
    if n == 0 or lo < 1 or hi < lo or not n * lo <= total <= n * hi:
        raise ValueError(f"allocate_rollouts: {n} tasks cannot share {total} episodes with {lo} to {hi} each")
    for r in rates:
        if r is not None and not 0 <= r <= 1:
            raise ValueError(f"allocate_rollouts: a success rate must be in [0, 1], got {r}")
    w = [0.25 if r is None else r * (1 - r) for r in rates]
    counts = [lo] * n
    turn = 0
    for _ in range(total - n * lo):
        open_ = [i for i in range(n) if counts[i] < hi]
        best = max(open_, key=lambda i: (w[i] / (counts[i] - lo + 1), -i))
        if w[best] <= 0:  # nothing informative left: spread evenly
            best = open_[turn % len(open_)]
            turn += 1
        counts[best] += 1
    return counts


class SuccessHistory:
    """The last ``window`` successes (True / False) of every task key; :meth:`rate` is their mean (None: no
    history). Plain data in :meth:`state_dict` (a checkpoint keeps it)."""

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"SuccessHistory: window must be >= 1, got {window}")
        self.window = window
        self.seen: dict[int, deque[bool]] = {}

    def add(self, key: int, success: bool) -> None:
        self.seen.setdefault(int(key), deque(maxlen=self.window)).append(bool(success))

    def rate(self, key: int) -> float | None:
        d = self.seen.get(int(key))
        return None if not d else sum(d) / len(d)

    def state_dict(self) -> dict:
        return {"window": self.window, "keys": list(self.seen), "values": [list(d) for d in self.seen.values()]}

    def load_state_dict(self, sd: dict) -> None:
        self.window = int(sd["window"])
        self.seen = {int(k): deque((bool(x) for x in v), maxlen=self.window) for k, v in zip(sd["keys"], sd["values"])}
