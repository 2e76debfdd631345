"""The ``auto`` preset: a rollout correction whose level and threshold are set each step.

The trainer fills ``level`` and ``threshold`` every step from the mismatch meter
(``tether.meter.auto.choose_correction``, rule in docs/meter.md); this module only maps a choice to
the existing presets' maths (``rollout_correction.tis`` and ``rollout_correction.mis``):

    token      l_t = min(rho_t, C) * l^PPO_t                              (tis, level token, cap C)
    sequence   l_t = min(prod_s rho_s, C) * l^PPO_t                       (tis, level sequence, cap C)
    geometric  l_t = 1[|mean_s log rho_s| <= tau] * l^PPO_t               (mis, level geometric,
                                                                           band [e^-tau, e^tau],
                                                                           unweighted, no veto)

with ``rho_t = pi_old(y_t) / mu(y_t)`` and ``C`` / ``tau`` = ``threshold``. Used outside the
trainer (no meter), the defaults make it token-level TIS with cap 2, i.e. the ``tis`` preset.
"""

from __future__ import annotations

import math

from torch import Tensor

from tether.objectives.inputs import LossInputs
from tether.objectives.registry import Preset, register
from tether.objectives.rollout_correction import _PPO_DEFAULTS, ISLevel, mis, tis


def auto_correction(
    inputs: LossInputs,
    *,
    agg: str,
    eps_low: float,
    eps_high: float,
    dual_clip_c: float | None,
    level: str,
    threshold: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clip times the correction ``level`` with ``threshold`` (module docstring)."""
    lvl = ISLevel.parse(level)
    ppo = {"agg": agg, "eps_low": eps_low, "eps_high": eps_high, "dual_clip_c": dual_clip_c}
    if lvl is ISLevel.GEOMETRIC:
        if not threshold > 0:
            raise ValueError(f"auto: geometric threshold tau must be > 0, got {threshold}")
        return mis(inputs, **ppo, level="geometric", low=math.exp(-threshold), high=math.exp(threshold),
                   weighted=False, veto=None)
    if not threshold >= 1:
        raise ValueError(f"auto: the {lvl.value} cap must be >= 1, got {threshold}")
    return tis(inputs, **ppo, level=lvl.value, cap=threshold, floor=0.0, self_normalise=False)


register(Preset(
    name="auto",
    description="Rollout correction chosen each step by the meter: token / sequence TIS or geometric rejection.",
    fn=auto_correction,
    defaults={**_PPO_DEFAULTS, "level": "token", "threshold": 2.0},
    advantage="grpo",
    source="tether.meter.auto (docs/meter.md 'The auto rule'); the tis and mis presets",
    requires=("logp_mu_BT",),
    equation=(
        "trainer sets (level, threshold) per step: token/sequence w = min(rho, C); geometric "
        "w_i = 1[|mean_t log rho_t| <= tau]; sg; l_t = w * l^PPO_t"
    ),
))
