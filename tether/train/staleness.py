"""The staleness policy of the async loop: pure functions of the rollout's per-token versions.

The age of a generated token consumed by the trainer at version ``s`` is ``a_t = s - v_t`` (``v_t``:
the weight version that sampled it). With the bound ``k`` (``max_staleness``):

    wait        the engine is never admitted to start a batch older than k (the loop enforces it);
                here nothing changes, and tokens with a > k are only counted (they must be 0)
    drop        every group (prompt) with a row holding a token of age a > k leaves the batch
                (the whole group, so group baselines stay unbiased); the async loop then refills the
                batch with as many fresh groups, sampled at version s (``async_loop.refill_dropped``)
    downweight  a token of age a > k keeps its row but its advantage is multiplied by
                w_t = decay^(a_t - k)  (1 for a <= k)

Dropping removes the slowest generations first when generation overlaps training (a long row's
early tokens age while it finishes), which biases training toward fast, easy prompts
(tinker-cookbook PR #822): ``drop_bias_metrics`` logs the reward and length of the dropped rows next
to the kept ones so the bias is visible.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tether.train.config import StalenessPolicy


def token_age_BT(version_BT: Tensor, mask_BT: Tensor, current_version: int) -> Tensor:
    """``current_version - version_BT`` on generated tokens, 0 elsewhere (long)."""
    return torch.where(mask_BT, current_version - version_BT, torch.zeros_like(version_BT))


def apply_staleness(version_BT: Tensor, mask_BT: Tensor, group_B: Tensor, current_version: int, *,
                    max_staleness: int, policy: StalenessPolicy, decay: float) -> tuple[Tensor, Tensor, dict[str, float]]:
    """``(keep_B, weight_BT, counts)`` under ``policy`` (module docstring).

    ``keep_B``: rows that stay in the batch; ``weight_BT``: per-token advantage multiplier (1 on
    kept in-bound tokens, ``decay^(a-k)`` beyond the bound under downweight, 1 outside the mask);
    ``counts``: ``async/stale_tokens`` (a > k), ``async/dropped_groups``, ``async/dropped_rows``,
    ``async/downweighted_tokens``, ``async/token_weight_mean`` (over generated tokens).
    """
    policy = StalenessPolicy(policy)
    age_BT = token_age_BT(version_BT, mask_BT, current_version)
    over_BT = mask_BT & (age_BT > max_staleness)
    keep_B = torch.ones(version_BT.shape[0], dtype=torch.bool, device=version_BT.device)
    weight_BT = torch.ones(version_BT.shape, dtype=torch.float32, device=version_BT.device)
    dropped_groups = 0
    if policy is StalenessPolicy.DROP:
        stale_rows = over_BT.any(-1)
        stale_groups = torch.unique(group_B[stale_rows])
        keep_B = ~torch.isin(group_B, stale_groups)
        dropped_groups = int(stale_groups.numel())
    elif policy is StalenessPolicy.DOWNWEIGHT:
        excess = (age_BT - max_staleness).clamp(min=0).to(torch.float32)
        weight_BT = torch.where(over_BT, torch.full_like(weight_BT, decay) ** excess, weight_BT)
    n_tok = mask_BT.sum().clamp(min=1)
    counts = {
        "async/stale_tokens": float(over_BT.sum()),
        "async/dropped_groups": float(dropped_groups),
        "async/dropped_rows": float((~keep_B).sum()),
        "async/downweighted_tokens": float(over_BT.sum()) if policy is StalenessPolicy.DOWNWEIGHT else 0.0,
        "async/token_weight_mean": float((weight_BT * mask_BT).sum() / n_tok),
    }
    return keep_B, weight_BT, counts


def drop_bias_metrics(rewards_B: Tensor, completion_len_B: Tensor, keep_B: Tensor) -> dict[str, float]:
    """Mean reward and completion length of kept and dropped rows (NaN for an empty side)."""
    out = {}
    for name, rows in (("kept", keep_B), ("dropped", ~keep_B)):
        n = int(rows.sum())
        out[f"async/{name}_reward_mean"] = float(rewards_B[rows].float().mean()) if n else float("nan")
        out[f"async/{name}_length_mean"] = float(completion_len_B[rows].float().mean()) if n else float("nan")
    return out
