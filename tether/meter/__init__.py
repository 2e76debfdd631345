"""The mismatch meter: measure, decompose and act on policy mismatch (docs/meter.md).

Pure functions of tensors (torch and numpy only); the report module alone imports matplotlib.
"""

from tether.meter.auto import AutoRule, CorrectionDecision, CorrectionLevel, choose_correction
from tether.meter.budget import Alarm, BudgetAction, MismatchBudget, check_budget
from tether.meter.decompose import Decomposition, decompose, decompose_log_ratio
from tether.meter.measure import RATIO_NAMES, correction_metrics, measure, to_floats
from tether.meter.stats import DEFAULT_THRESHOLDS, profile_stats, ratio_stats

__all__ = [
    "Alarm",
    "AutoRule",
    "BudgetAction",
    "CorrectionDecision",
    "CorrectionLevel",
    "MismatchBudget",
    "check_budget",
    "choose_correction",
    "DEFAULT_THRESHOLDS",
    "RATIO_NAMES",
    "Decomposition",
    "correction_metrics",
    "decompose",
    "decompose_log_ratio",
    "measure",
    "profile_stats",
    "ratio_stats",
    "to_floats",
]
