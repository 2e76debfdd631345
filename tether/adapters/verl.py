"""tether presets as verl policy losses, tether's correction weights for verl's ``rollout_is_weights``,
and the meter over verl's batch tensors. verl is imported only by ``register_with_verl``.

verl selects a policy loss by name (``actor_rollout_ref.actor.policy_loss.loss_mode``) from the
registry ``verl.trainer.ppo.core_algos.register_policy_loss`` fills, and calls it as

    fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)

``policy_loss(preset)`` builds such a function for a tether preset; ``register_with_verl()`` registers
``tether_<preset>`` for every preset verl can feed. The registry lives in each worker process, so the
import must run in every Ray worker: put ``tether.adapters.verl_register`` in verl's
``actor_rollout_ref.model.external_lib`` (docs/adapters.md).

Conventions (``LossInputs`` from verl's arguments):

- ``logp_theta`` = ``log_prob``, ``logp_old`` = ``old_log_prob``, ``mask`` = ``response_mask``;
- aggregation: verl's ``loss_agg_mode`` (``token-mean``, ``seq-mean-token-mean``, ``seq-mean-token-sum``,
  ``seq-mean-token-sum-norm``; tether has no ``token-sum``) replaces the preset's ``agg``;
- normalisers from ``config.global_batch_info``: ``num_tokens = batch_num_tokens / dp_size``,
  ``num_seqs = global_batch_size / dp_size``, ``horizon = loss_scale_factor`` (each local when absent,
  as in verl's ``agg_loss``);
- the loss function never sees the rollout (behaviour) log-probs. Presets that correct for mu (``tis``,
  ``icepop``, ``mis``) take their correction as ``rollout_is_weights``: verl's own rollout correction
  (``algorithm.rollout_correction``: token TIS = ``rollout_is=token`` with ``rollout_is_threshold=cap``;
  IcePop = threshold ``"low_high"``), or the weights ``rollout_is_weights(preset, ...)`` computes from
  ``old_log_probs`` and ``rollout_log_probs`` (exactly tether's, for every level and mask). PPO presets
  (``ppo``, ``grpo``, ``dapo``, ``dr_grpo``) multiply their per-token loss by ``rollout_is_weights`` when
  verl passes them, as verl's ``vanilla`` does; other presets refuse them.

Metrics: the objective's metrics as floats under ``tether/`` (verl averages them over micro-batches).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tether.adapters.common import Objective, objective_and_meter_metrics, prefixed
from tether.objectives import AggMode, LossInputs, presets
from tether.objectives.policy_gradient import ppo
from tether.objectives.rollout_correction import (
    LENGTH_DEFAULTS,
    icepop_weights,
    masked_is_weights,
    self_normalised_weights,
    truncated_is_weights,
    weighted_ppo,
)

SIGNATURE = ("old_log_prob", "log_prob", "advantages", "response_mask", "loss_agg_mode", "config",
             "rollout_is_weights")
"""verl's policy-loss signature (``core_algos.PolicyLossFn``); a contract test checks verl's ``vanilla``."""
PREFIX = "tether_"
"""Registered names are ``tether_<preset>``."""


def _length(args: Mapping[str, Any]) -> dict[str, Any]:
    """The length-calibration arguments of a preset's resolved hyper-parameters."""
    return {k: args[k] for k in LENGTH_DEFAULTS}


def _tis(old: Tensor, mu: Tensor, mask: Tensor, args: Mapping[str, Any]) -> Tensor:
    w, _ = truncated_is_weights(old, mu, mask, level=args["level"], cap=args["cap"], floor=args["floor"],
                                **_length(args))
    return self_normalised_weights(w, mask, level=args["level"])[0] if args["self_normalise"] else w


WEIGHTS: dict[str, Callable[[Tensor, Tensor, Tensor, Mapping[str, Any]], Tensor]] = {
    "tis": _tis,
    "icepop": lambda old, mu, mask, a: icepop_weights(old, mu, mask, low=a["low"], high=a["high"], level=a["level"],
                                                      **_length(a))[0],
    "mis": lambda old, mu, mask, a: masked_is_weights(old, mu, mask, level=a["level"], low=a["low"], high=a["high"],
                                                      weighted=a["weighted"], veto=a["veto"], **_length(a))[0],
}
"""Presets whose correction of ``pi_old/mu`` is a detached per-token weight on the PPO loss: the weight."""


def rollout_is_weights(preset: str, old_log_probs: Tensor, rollout_log_probs: Tensor, response_mask: Tensor,
                       **overrides: Any) -> Tensor:
    """The detached weight tether's ``preset`` puts on each token's PPO loss, from verl's batch tensors
    ``old_log_probs`` (pi_old), ``rollout_log_probs`` (mu) and ``response_mask``, for verl's
    ``rollout_is_weights`` slot (0 on padding). ``preset``: one of ``WEIGHTS``."""
    if preset not in WEIGHTS:
        raise ValueError(f"rollout_is_weights: preset '{preset}' has no per-token weight; valid: {', '.join(WEIGHTS)}")
    args = Objective.resolve(preset, overrides, provides=("logp_mu_BT",), framework="verl").args
    with torch.no_grad():
        return WEIGHTS[preset](old_log_probs, rollout_log_probs, response_mask, args)


def _counts(config: Any, agg: AggMode) -> dict[str, Any]:
    """``num_tokens``, ``num_seqs``, ``horizon`` from ``config.global_batch_info`` (module docstring)."""
    info = {} if config is None else dict(getattr(config, "global_batch_info", None) or {})
    dp = info.get("dp_size") or 1
    tokens, seqs = info.get("batch_num_tokens"), info.get("global_batch_size")
    if dp > 1 and ((agg is AggMode.TOKEN_MEAN and tokens is None) or (agg is not AggMode.TOKEN_MEAN and seqs is None)):
        raise ValueError(f"tether verl loss: dp_size={dp} needs global_batch_info batch_num_tokens and "
                         "global_batch_size (verl sets them in ppo_loss)")
    return {"num_tokens": None if tokens is None else torch.as_tensor(tokens, dtype=torch.float64) / dp,
            "num_seqs": None if seqs is None else torch.as_tensor(seqs, dtype=torch.float64) / dp,
            "horizon": info.get("loss_scale_factor")}


def policy_loss(preset: str, overrides: Mapping[str, Any] | None = None) -> Callable[..., tuple[Tensor, dict]]:
    """A verl policy-loss function (``SIGNATURE``) computing tether's ``preset`` (module docstring)."""
    weighted = preset in WEIGHTS
    objective = Objective.resolve(preset, overrides, provides=("logp_mu_BT",) if weighted else (), framework="verl")
    args = dict(objective.args)
    takes_weights = weighted or objective.preset.fn is ppo

    def loss_fn(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                loss_agg_mode: str = "token-mean", config: Any = None,
                rollout_is_weights: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        agg = AggMode.parse(loss_agg_mode)
        li = LossInputs(logp_theta_BT=log_prob, logp_old_BT=old_log_prob, advantages_BT=advantages,
                        mask_BT=response_mask, **_counts(config, agg))
        if rollout_is_weights is not None and not takes_weights:
            raise ValueError(f"{PREFIX}{preset} does not take verl's rollout_is_weights: disable "
                             "algorithm.rollout_correction.rollout_is, or use a PPO or correction preset")
        if weighted and rollout_is_weights is None:
            raise ValueError(f"{PREFIX}{preset} corrects pi_old/mu with rollout_is_weights, which verl did not pass: "
                             "enable algorithm.rollout_correction.rollout_is (docs/adapters.md)")
        if takes_weights and rollout_is_weights is not None:
            loss, metrics = weighted_ppo(li, rollout_is_weights, agg.value, args["eps_low"], args["eps_high"],
                                         args["dual_clip_c"])
        else:
            loss, metrics = objective.preset(li, **{**args, "agg": agg.value})
        return loss, prefixed(metrics)

    loss_fn.__name__ = f"{PREFIX}{preset}"
    loss_fn.__qualname__ = loss_fn.__name__
    return loss_fn


def verl_presets() -> list[str]:
    """The presets verl can feed: no input beyond ``old_log_prob``/``log_prob`` (mu presets through their weights)
    and no whole-step statistic."""
    return sorted(name for name, p in presets().items()
                  if p.batch_stats is None and (name in WEIGHTS or not p.requires))


def register_with_verl(names: Iterable[str] | None = None) -> list[str]:
    """Register ``tether_<preset>`` in verl's policy-loss registry for ``names`` (default: ``verl_presets()``);
    returns the registered names. Imports verl."""
    from verl.trainer.ppo.core_algos import register_policy_loss

    out = []
    for name in verl_presets() if names is None else names:
        register_policy_loss(f"{PREFIX}{name}")(policy_loss(name))
        out.append(f"{PREFIX}{name}")
    return out


VERL_KEYS = {"logp_mu": "rollout_log_probs", "logp_old": "old_log_probs", "mask": "response_mask"}
"""tether dump column -> verl batch key."""


def meter_metrics(batch: Mapping[str, Tensor], *, profiles: bool = False) -> dict[str, float]:
    """The meter of one verl batch (``data.batch``: ``old_log_probs``, ``rollout_log_probs``,
    ``response_mask``) as ``tether/meter/...`` floats, for ``metrics.update(...)`` in the trainer loop."""
    missing = [k for k in VERL_KEYS.values() if k not in batch]
    if missing:
        raise ValueError(f"meter_metrics: the verl batch has no {', '.join(missing)} (rollout_log_probs needs "
                         "actor_rollout_ref.rollout.calculate_log_probs=True)")
    old = batch["old_log_probs"]
    return objective_and_meter_metrics({}, mask_BT=batch["response_mask"], logp_current_BT=old,
                                       logp_behave_old_BT=None, logp_mu_BT=batch["rollout_log_probs"],
                                       profiles=profiles)


def dump_batch(batch: Mapping[str, Tensor], path: str | Path, *, step: int | None = None) -> int:
    """Append one verl batch's per-token log-probs to the JSONL ``path`` under verl's own names (``tether meter``
    reads them as aliases); one line per sequence, padding trimmed. Returns the number of lines written."""
    missing = [k for k in VERL_KEYS.values() if k not in batch]
    if missing:
        raise ValueError(f"dump_batch: the verl batch has no {', '.join(missing)}")
    mask = batch["response_mask"].bool()
    cols = {k: batch[k].detach().double().cpu() for k in ("rollout_log_probs", "old_log_probs")}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lengths = mask.int().cpu()
    with path.open("a") as f:
        for b in range(mask.shape[0]):
            n = int(torch.nonzero(lengths[b]).max()) + 1 if lengths[b].any() else 0
            row = {k: v[b, :n].tolist() for k, v in cols.items()}
            row["response_mask"] = lengths[b, :n].tolist()
            if step is not None:
                row["step"] = step
            f.write(json.dumps(row) + "\n")
    return mask.shape[0]
