"""The update phase of one RL step: epochs x mini-batches x micro-batches of the objective preset.

    for each epoch:  shuffle the kept rows (seeded by (seed, step, 2))
      for each mini-batch (one optimiser step):
        normalisers (tokens, sequences) and the preset's whole-batch statistics over the mini-batch
        for each micro-batch: forward -> preset (checked entry point) [+ KL in the loss] -> backward
        clip the global gradient norm -> optimiser step

Split invariance: every quantity that depends on the whole optimiser step is computed once for it and
passed to every micro-batch: the token / sequence counts, and ``Preset.batch_stats`` (P3O's ESS, ...),
which needs the step's ``pi_theta`` before the first backward, so a mini-batch split into several
micro-batches first runs one forward without gradients over them (only for presets that have such a
statistic). The result is the update of the unsplit mini-batch (tests/unit/test_update_split.py).

Sharded trainer ranks (``ranks``, tether/dist/ranks.py) split every micro-batch once more: rank r of R takes
``micro.tensor_split(R)[r]`` and keeps the mini-batch's normalisers, so its loss is its share of the global loss

    L = sum_r L_r,   L_r = (the preset's loss of rank r's rows, normalised by the mini-batch's token / sequence counts)

and FSDP2 sums the ranks' gradients (divide factor 1): grad L, the single-process gradient. A rank whose slice is
empty runs the micro-batch's first row with weight 0 (every rank enters every collective); the finite check is
agreed across ranks, and the logged loss is summed over them (the other metrics averaged).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from tether.objectives import LossInputs, aggregate
from tether.rollout import Rollout
from tether.train.seeds import step_seed


def update_phase(cfg, preset, objective_args: dict[str, Any], model: torch.nn.Module, optimizer, rollout: Rollout,
                 keep_B: Tensor, logp_old_BT: Tensor, logp_ref_BT: Tensor | None, advantages_BT: Tensor, step: int, *,
                 logprobs: Callable[[torch.nn.Module, Rollout], tuple[Tensor, Tensor]],
                 kl_loss: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
                 first_logp_theta_BT: Tensor | None = None,
                 prox_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
                 extra_inputs: dict[str, Tensor] | None = None, ranks: Any = None) -> dict[str, Any]:
    """Mini-batch epochs over one step's rollouts; returns averaged metrics and a finiteness flag.

    A mini-batch whose loss or gradient is non-finite is skipped (its gradient is dropped, no
    optimiser step); the step then counts as bad. ``first_logp_theta_BT`` (all rows, with its graph,
    computed at the current weights) stands in for the first micro-batch's forward. ``prox_fn(logp_theta_BT,
    rows) -> logp_old`` (async loop, old_logits=loglinear) makes the anchor from each micro-batch's own
    forward. ``kl_loss(logp_theta_BT, logp_ref_BT, mask_BT, logp_mu_BT) -> (per-token KL, metrics)`` adds the KL
    penalty to the loss (token-mean over the mini-batch; its value logged as ``kl/loss``). ``extra_inputs``: per-row ``LossInputs`` fields (``expert_B``, ...)
    indexed with the rows like the rest. ``ranks``: this rank's place among sharded trainer ranks (module
    docstring); None: one process.
    """
    rows = torch.nonzero(keep_B).flatten()
    n_mini = min(cfg.minibatches, len(rows))
    gen = torch.Generator().manual_seed(step_seed(cfg.seed, step, 2))
    metric_sums: dict[str, float] = {}
    n_micro, losses, grad_norms, finite = 0, [], [], True

    def inputs_for(idx: Tensor, logp_theta_BT: Tensor, norm: dict[str, Any]) -> LossInputs:
        sub = rollout.select(idx)
        old_BT = logp_old_BT[idx] if prox_fn is None else prox_fn(logp_theta_BT, idx)
        extra = {k: v[idx] for k, v in (extra_inputs or {}).items()}
        return LossInputs(
            logp_theta_BT=logp_theta_BT, logp_old_BT=old_BT, advantages_BT=advantages_BT[idx],
            mask_BT=sub.loss_mask_BT, logp_mu_BT=sub.logp_mu_BT, logp_prox_BT=old_BT,
            logp_ref_BT=None if logp_ref_BT is None else logp_ref_BT[idx], step_BT=sub.turn_BT, **norm, **extra)

    for _ in range(cfg.epochs):
        order = rows[torch.randperm(len(rows), generator=gen)]
        for mini in order.chunk(n_mini):
            mask = rollout.loss_mask_BT[mini]
            norm = {"num_tokens": mask.sum().item(), "num_seqs": (mask.sum(-1) > 0).sum().item(),
                    "horizon": cfg.max_new_tokens}
            micros = mini.split(cfg.micro_batch_size or len(mini))
            args = objective_args
            if preset.batch_stats is not None and (len(micros) > 1 or ranks is not None):  # whole-step statistics
                with torch.no_grad():
                    theta_BT = torch.cat([logprobs(model, rollout.select(m))[0] for m in micros])
                    args = preset.step_overrides(inputs_for(torch.cat(list(micros)), theta_BT, norm), objective_args)
            optimizer.zero_grad(set_to_none=True)
            mini_loss, ok = 0.0, True
            for micro in micros:
                weight = 1.0
                if ranks is not None:  # this rank's share of the micro-batch (an empty share: one row, weight 0)
                    mine = micro.tensor_split(ranks.world)[ranks.rank]
                    micro, weight = (mine, 1.0) if len(mine) else (micro[:1], 0.0)
                if first_logp_theta_BT is not None:  # same weights, same rows: reuse that forward
                    logp_theta_BT, first_logp_theta_BT = first_logp_theta_BT[micro], None
                else:
                    logp_theta_BT, _ = logprobs(model, rollout.select(micro))
                inputs = inputs_for(micro, logp_theta_BT, norm)
                loss, metrics = preset(inputs, **args)
                if kl_loss is not None:
                    kl_BT, kl_metrics = kl_loss(logp_theta_BT, inputs.logp_ref_BT, inputs.mask_BT, inputs.logp_mu_BT)
                    kl_term = aggregate(kl_BT, inputs.mask_BT, "token-mean", num_tokens=norm["num_tokens"])
                    loss = loss + kl_term
                    metrics = {**metrics, **kl_metrics, "kl/loss": kl_term.detach()}
                finite_here = bool(torch.isfinite(loss))
                if ranks is not None:  # every rank skips together (a lone break would leave the others waiting)
                    finite_here = ranks.all_sum([float(not finite_here)])[0] == 0
                if not finite_here:
                    ok = False
                    break
                (loss * weight).backward()
                mini_loss += weight * float(loss.detach())
                for k, v in metrics.items():
                    metric_sums[k] = metric_sums.get(k, 0.0) + weight * float(v)
                n_micro += int(weight)
            clip = cfg.grad_clip if cfg.grad_clip is not None else math.inf  # none: measured, not clipped
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)) if ok else math.nan
            if not math.isfinite(grad_norm):
                optimizer.zero_grad(set_to_none=True)
                finite = False
                continue
            optimizer.step()
            losses.append(mini_loss)
            grad_norms.append(grad_norm)
    if ranks is not None:  # every rank ran the same micro-batches: the same keys, in the same order
        keys = sorted(metric_sums)
        *sums, n_micro = ranks.all_sum([metric_sums[k] for k in keys] + [n_micro])
        metric_sums = dict(zip(keys, sums))
        losses = ranks.all_sum(losses) if losses else losses
    out: dict[str, Any] = {k: v / max(n_micro, 1) for k, v in metric_sums.items()}
    out["loss"] = sum(losses) / max(len(losses), 1)
    out["grad_norm"] = sum(grad_norms) / max(len(grad_norms), 1)
    out["finite"] = finite
    return out
