"""TRL's ``GRPOTrainer`` with a tether objective as its loss and tether's meter in its logs.

TRL has no loss plug-in; the supported way is a subclass that overrides ``_compute_loss(model, inputs)``.
``TetherGRPOTrainer`` does that once for every tether RL preset::

    trainer = TetherGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...,
                                objective="tis", objective_args={"cap": 2.0})

How TRL's ``inputs`` map onto ``LossInputs`` (docs/adapters.md, "Conventions"):

- ``logp_theta``: TRL's own ``_get_per_token_logps_and_entropies`` (temperature, chunking, multimodal
  inputs as TRL does them); ``logp_old``: ``old_per_token_logps``, or the detached current log-probs
  when TRL skipped them (on-policy: one iteration, no generation batch larger than the window);
  ``logp_mu``: ``sampling_per_token_logps`` (vLLM's log-probs) when present, else ``logp_old`` (the
  trainer generated the tokens itself: the correction weights are 1); tokens vLLM could not score
  (NaN) fall back to ``logp_old`` too;
- ``mask``: ``completion_mask * tool_mask``; ``advantages`` broadcast over tokens;
- normalisers for gradient accumulation: ``num_tokens`` = TRL's own window normaliser
  (``num_items_in_batch / processes * accumulation_steps / steps_per_generation``), ``num_seqs`` =
  rows in the accumulation window (``rows * accumulation_steps``; TRL counts empty rows, and so does
  the adapter), ``horizon`` = ``max_completion_length``. Each micro-batch's loss is then its share of
  the window's loss (TRL's ``loss_is_scaled_for_ga``: the Trainer does not divide again).

Entropy mask (``top_entropy_quantile < 1``): TRL's own ``get_high_entropy_mask`` (the quantile over every
process's loss tokens) zeroes the advantage of the low-entropy tokens, so their per-token loss is 0 while
the aggregation still counts them, as in TRL (which multiplies the per-token policy loss by the mask). That
is TRL's maths exactly for presets whose per-token loss is its advantage times a function of that token
(``ADVANTAGE_MASKABLE``, checked in tests/unit/test_adapter_terms.py); other presets are refused.

KL (``beta != 0``): TRL's own penalty, ``beta * k3(log pi_theta - log pi_ref)`` on every loss token
(times ``pi_theta/pi_old`` with ``use_bias_correction_kl``), added to the preset's loss and aggregated
like it (``common.kl_to_reference_term``), so the loss equals TRL's with the same ``beta``.

TRL's own mismatch correction (``vllm_importance_sampling_correction``) is not applied: the tether
objective is the correction. TRL's advantages are used as they are (``scale_rewards`` etc.); a
preset's advantage estimator does not apply. The other features whose maths lives in TRL's loss (entropy
bonus, off-policy masks, ``delta``, sequence-level ``importance_sampling_level``) are refused at
construction rather than silently dropped: tether presets cover them (``gspo``, ``mis``, ...).

Metrics: every objective metric and meter statistic, under ``tether/`` in TRL's ``_metrics``
(averaged over processes), so they appear in TRL's logs and trackers beside ``sampling/*``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor
from trl import GRPOTrainer

from tether.adapters.common import (
    ADVANTAGE_MASKABLE,
    Objective,
    kl_to_reference_term,
    objective_and_meter_metrics,
    prefixed,
)
from tether.objectives import LossInputs

FORWARD_ARGS = ("model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy",
                "compute_aux_loss")
"""The parameters of ``GRPOTrainer._get_per_token_logps_and_entropies`` the adapter sets itself; every
other parameter (pixel values, image sizes, ...) is forwarded from ``inputs`` by name."""
REQUIRED_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages",
                 "num_items_in_batch")
"""``inputs`` keys the adapter reads unconditionally."""
OPTIONAL_KEYS = ("tool_mask", "old_per_token_logps", "sampling_per_token_logps", "ref_per_token_logps")
"""``inputs`` keys the adapter reads when TRL provides them."""
PROVIDES = ("logp_mu_BT",)
"""Optional ``LossInputs`` fields the adapter fills (presets needing others are refused)."""


def _forwarded_keys() -> tuple[str, ...]:
    params = inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters
    return tuple(p for p in params if p != "self" and p not in FORWARD_ARGS)


UNSUPPORTED = (
    ("off_policy_mask_threshold", None, "an off-policy sequence mask (tether preset 'mis')"),
    ("entropy_coef", 0.0, "an entropy bonus"),
    ("use_adaptive_entropy", False, "an adaptive entropy bonus"),
    ("delta", None, "two-sided clipping (tether presets 'ppo' / 'tis' have a dual clip)"),
    ("importance_sampling_level", "token", "a sequence-level ratio (tether preset 'gspo')"),
)
"""``(GRPOConfig field, the only value the adapter accepts, what the field would add to TRL's loss)``."""


def check_config(args: Any, objective: str) -> None:
    """Refuse every ``GRPOConfig`` setting whose maths lives in TRL's own loss (``UNSUPPORTED``), and TRL's
    entropy mask with a preset outside ``ADVANTAGE_MASKABLE``."""
    bad = [f"{name}={getattr(args, name)!r} ({what})" for name, ok, what in UNSUPPORTED
           if hasattr(args, name) and getattr(args, name) != ok]
    if bad:
        raise ValueError("TetherGRPOTrainer computes the loss with a tether objective, so these GRPOConfig settings "
                         f"would be ignored: {'; '.join(bad)}. Leave them at their defaults.")
    if args.top_entropy_quantile < 1.0 and objective not in ADVANTAGE_MASKABLE:
        raise ValueError(f"GRPOConfig top_entropy_quantile={args.top_entropy_quantile!r} (TRL's entropy mask) is not "
                         f"supported with objective '{objective}', whose loss is not its advantage times a per-token "
                         f"term; presets that support it: {', '.join(ADVANTAGE_MASKABLE)}")


class TetherGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose loss is the tether preset ``objective`` (module docstring).

    ``objective_args``: the preset's hyper-parameter overrides (checked now); ``meter``: log the
    mismatch meter with the objective's metrics; ``meter_profiles``: also the per-bucket profiles
    (about 115 keys per ratio). Every other argument is ``GRPOTrainer``'s.
    """

    def __init__(self, *args: Any, objective: str = "tis", objective_args: Mapping[str, Any] | None = None,
                 meter: bool = True, meter_profiles: bool = False, **kwargs: Any) -> None:
        self.tether_objective = Objective.resolve(objective, objective_args, provides=PROVIDES, framework="TRL")
        self.tether_meter = meter
        self.tether_meter_profiles = meter_profiles
        self._tether_forwarded = _forwarded_keys()
        self.tether_dumps: list[Any] = []
        """Callbacks given the per-token log-probs of each training micro-batch (``trl_dump.LogProbDump``)."""
        super().__init__(*args, **kwargs)
        check_config(self.args, self.tether_objective.name)
        self.tether_dumps = [c for c in self.callback_handler.callbacks if hasattr(c, "record_batch")]
        for dump in self.tether_dumps:
            dump.fed_by = type(self).__name__

    def tether_counts(self, inputs: Mapping[str, Any], rows: int) -> tuple[Tensor, float]:
        """``(num_tokens, num_seqs)`` of the accumulation window, per process (module docstring)."""
        train = self.model.training
        window = self.current_gradient_accumulation_steps if train else 1
        num_tokens = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if train:
            num_tokens = num_tokens * window / self.args.steps_per_generation
        return num_tokens, float(rows * window)

    def tether_loss_inputs(self, inputs: Mapping[str, Any], logp_BT: Tensor) -> LossInputs:
        """TRL's ``inputs`` and the current log-probs as ``LossInputs`` (module docstring)."""
        mask = inputs["completion_mask"]
        if inputs.get("tool_mask") is not None:
            mask = mask * inputs["tool_mask"]
        old = inputs.get("old_per_token_logps")
        old = logp_BT.detach() if old is None else old
        mu = inputs.get("sampling_per_token_logps")
        mu = old if mu is None else torch.where(torch.isnan(mu), old, mu)
        adv = inputs["advantages"]
        adv_BT = adv[:, None].expand_as(logp_BT) if adv.dim() == 1 else adv.expand_as(logp_BT)
        num_tokens, num_seqs = self.tether_counts(inputs, logp_BT.shape[0])
        return LossInputs(logp_theta_BT=logp_BT, logp_old_BT=old, advantages_BT=adv_BT, mask_BT=mask, logp_mu_BT=mu,
                          logp_ref_BT=inputs.get("ref_per_token_logps"), num_tokens=num_tokens, num_seqs=num_seqs,
                          horizon=self.max_completion_length)

    def tether_entropy_masked(self, li: LossInputs, entropy_BT: Tensor) -> LossInputs:
        """``li`` with the advantage zeroed off TRL's high-entropy mask (module docstring); ``li`` itself when
        ``top_entropy_quantile`` is 1. The KL term and the meter keep every loss token."""
        if self.top_entropy_quantile >= 1.0:
            return li
        keep_BT = self.get_high_entropy_mask(entropy_BT, li.mask_BT, 1 - self.top_entropy_quantile)
        return replace(li, advantages_BT=li.advantages_BT * keep_BT.to(li.advantages_BT.dtype))

    def _compute_loss(self, model, inputs):
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        logp_BT, entropy_BT, aux_loss = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled, **{k: inputs.get(k) for k in self._tether_forwarded})
        li = self.tether_loss_inputs(inputs, logp_BT)
        loss, metrics = self.tether_objective(self.tether_entropy_masked(li, entropy_BT))
        if self.beta != 0.0:
            kl_term, kl_metrics = kl_to_reference_term(li, coef=self.beta, agg=self.tether_objective.args["agg"],
                                                       ratio_weighted=self.args.use_bias_correction_kl)
            loss = loss + kl_term
            metrics = {**metrics, **kl_metrics}
        mode = "train" if self.model.training else "eval"
        if self.aux_loss_enabled:
            window = self.current_gradient_accumulation_steps if mode == "train" else 1
            loss = loss + self.router_aux_loss_coef * aux_loss / window
        self._tether_log(mode, inputs, li, metrics, entropy_BT)
        return loss

    def _tether_log(self, mode: str, inputs: Mapping[str, Any], li: LossInputs, metrics: Mapping[str, Tensor],
                    entropy_BT: Tensor | None) -> None:
        """The objective's metrics and the meter into TRL's ``_metrics`` (mean over processes), and the
        micro-batch's log-probs to every dump callback."""
        mu = li.logp_mu_BT if inputs.get("sampling_per_token_logps") is not None else None
        behave = inputs.get("old_per_token_logps")
        current = li.logp_theta_BT.detach()
        if self.tether_meter:
            floats = objective_and_meter_metrics(metrics, mask_BT=li.mask_BT, logp_current_BT=current,
                                                 logp_behave_old_BT=behave, logp_mu_BT=mu, entropy_BT=entropy_BT,
                                                 profiles=self.tether_meter_profiles)
        else:
            floats = prefixed(metrics)
        keys = list(floats)
        values = torch.tensor([floats[k] for k in keys], dtype=torch.float64, device=current.device)
        gathered = self.accelerator.gather(values[None]).reshape(-1, len(keys)).nanmean(0).tolist()
        for k, v in zip(keys, gathered):
            self._metrics[mode][k].append(v)
        for dump in self.tether_dumps if mode == "train" else ():
            dump.record_batch(step=self.state.global_step, mask_BT=li.mask_BT, logp_current_BT=current,
                              logp_behave_old_BT=behave, logp_mu_BT=mu, entropy_BT=entropy_BT)
