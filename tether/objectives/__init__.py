"""The objective algebra: pure functions of per-token tensors. Imports only torch.

Entry points: ``LossInputs`` (the tensors), ``get_preset(name)`` / ``presets()`` (the named
compositions), ``aggregate`` (loss reduction). Building blocks live in their modules:
``ratios``, ``policy_gradient``, ``rollout_correction``, ``decoupled``, ``sequence_ratio``,
``ess``, ``weighted_pg``, ``advantages``, ``kl``, ``hybrid``.
"""

from tether.objectives.aggregation import AggMode, aggregate
from tether.objectives.inputs import LossInputs, masked_mean
from tether.objectives.registry import Preset, get_preset, presets, register

__all__ = ["AggMode", "LossInputs", "Preset", "aggregate", "get_preset", "masked_mean", "presets", "register"]
