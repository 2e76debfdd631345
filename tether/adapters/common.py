"""What every adapter shares: a preset resolved once, called through the checked entry point, and
the meter as plain floats under one prefix. Imports torch and tether only (no framework).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from tether.meter.measure import measure, to_floats
from tether.objectives import LossInputs, Preset, aggregate, get_preset, masked_mean
from tether.objectives.kl import IMPORTANCE_CORRECTED, kl_penalty_in_loss

PREFIX = "tether/"
"""Every metric an adapter logs into its framework's logs starts with this."""

ADVANTAGE_MASKABLE = ("reinforce", "ppo", "grpo", "dr_grpo", "dapo", "tis", "icepop", "mis", "auto", "dppo", "sapo",
                      "vespo", "rejection", "opsm", "roll_infer", "gspo", "ctpo", "ctpo_geomean", "cispo", "topr")
"""Presets whose loss, with the advantage zeroed on some tokens, is their loss with those tokens' per-token
loss zeroed and nothing else changed (every token's term is its advantage times a function of that token,
with the normalisers given): how an adapter applies a framework's token mask on the policy loss alone
(TRL's entropy mask). Checked for each in tests/unit/test_adapter_terms.py."""


@dataclass(frozen=True)
class Objective:
    """A tether preset with its hyper-parameters, checked against what the host framework provides."""

    preset: Preset
    args: Mapping[str, Any]

    @classmethod
    def resolve(cls, name: str, overrides: Mapping[str, Any] | None, *, provides: Iterable[str],
                framework: str) -> Objective:
        """``get_preset(name)`` with ``overrides`` validated now (an unknown name or hyper-parameter is an
        error listing the valid ones), and an error if the preset needs an input ``framework`` does not
        provide (``provides``: ``LossInputs`` field names) or a whole-step statistic (``batch_stats``)."""
        preset = get_preset(name)
        args = preset.resolve(overrides)
        missing = [f for f in preset.requires if f not in set(provides)]
        if missing:
            raise ValueError(f"objective '{name}' needs LossInputs.{', '.join(missing)}, which {framework} does not "
                             "provide; use an RL preset (tether objectives lists them)")
        if preset.batch_stats is not None:
            raise ValueError(f"objective '{name}' reads a statistic of the whole optimiser step, which {framework} "
                             "does not show to one micro-batch's loss; not supported by this adapter")
        return cls(preset=preset, args=dict(args))

    @property
    def name(self) -> str:
        return self.preset.name

    def __call__(self, inputs: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        return self.preset(inputs, **self.args)


def kl_to_reference_term(inputs: LossInputs, *, coef: float, ratio_weighted: bool, agg: str
                         ) -> tuple[Tensor, dict[str, Tensor]]:
    """A KL penalty to ``inputs.logp_ref_BT`` added to a preset's loss, aggregated like the preset's own loss
    (same mask, mode and global normalisers), as a framework that adds it to the per-token loss does (TRL's
    ``beta``). With ``z_t = log pi_theta(y_t) - log pi_ref(y_t)`` and ``r_t = pi_theta(y_t) / pi_old(y_t)``::

        k_t  = exp(-z_t) - 1 + z_t                 (k3; ratio_weighted: r_t * k3, r_t differentiated)
        term = coef * aggregate(k_t, mask, agg, num_tokens, num_seqs, horizon)

    ``ratio_weighted`` is TRL's ``use_bias_correction_kl`` (``importance_corrected_kl`` with pi_old as the
    sampling policy). Values are clamped as in ``tether.objectives.kl`` (``|z| <= 20``, k3's exponent
    ``<= 10``); within those bounds the value and gradient are exact. Metrics: ``kl/loss`` (the term) and
    ``kl/mean`` (the token mean of ``k_t``, TRL's ``kl``).
    """
    if inputs.logp_ref_BT is None:
        raise ValueError("a KL penalty to the reference needs LossInputs.logp_ref_BT (the reference log-probs)")
    estimator = IMPORTANCE_CORRECTED if ratio_weighted else "k3"
    k_BT = kl_penalty_in_loss(inputs.logp_theta_BT, inputs.logp_ref_BT, inputs.mask_BT, estimator=estimator,
                              logp_mu_BT=inputs.logp_old_BT)
    term = coef * aggregate(k_BT, inputs.mask_BT, agg, num_tokens=inputs.num_tokens, num_seqs=inputs.num_seqs,
                            horizon=inputs.horizon)
    return term, {"kl/loss": term.detach(), "kl/mean": masked_mean(k_BT.detach(), inputs.mask_BT)}


def prefixed(metrics: Mapping[str, Any], prefix: str = PREFIX) -> dict[str, float]:
    """Floats of ``metrics`` (tensors converted in one transfer) under ``prefix``; strings dropped."""
    return {prefix + k: v for k, v in to_floats(metrics).items() if isinstance(v, float)}


def objective_and_meter_metrics(
    objective_metrics: Mapping[str, Tensor],
    *,
    mask_BT: Tensor,
    logp_current_BT: Tensor,
    logp_behave_old_BT: Tensor | None,
    logp_mu_BT: Tensor | None,
    entropy_BT: Tensor | None = None,
    profiles: bool = False,
) -> dict[str, float]:
    """The objective's metrics and the meter of one micro-batch, as ``tether/...`` floats.

    ``logp_current_BT``: the trainer's policy at the current weights (detached); ``logp_behave_old_BT``:
    the trainer's policy at the weights that generated the batch (``None``: the same weights);
    ``logp_mu_BT``: the engine's log-probs (``None``: no separate engine). With all three, the meter
    splits ``log pi_current/mu`` into engine (``pi_behave_old/mu``) and staleness
    (``pi_current/pi_behave_old``).
    """
    behave = logp_current_BT if logp_behave_old_BT is None else logp_behave_old_BT
    meter = measure(mask_BT=mask_BT, logp_old_BT=logp_current_BT.detach(), logp_mu_BT=logp_mu_BT,
                    logp_behave_old_BT=behave.detach(), entropy_BT=None if entropy_BT is None else entropy_BT.detach(),
                    objective_metrics=objective_metrics, profiles=profiles)
    return prefixed({**objective_metrics, **meter})
