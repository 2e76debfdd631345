"""The mismatch budget: thresholds on the meter's statistics and what to do when one is crossed.

``check_budget`` is pure: it reads a metrics dict (tensors or floats, as ``measure`` returns them)
and returns the alarms; the trainer applies the actions (warn: log it; tighten: tighten the
correction; lower_lr: lower the learning rate; stop: stop with the alarm's message). A budget
field left as ``None`` is not checked. A checked metric that is NaN or infinite always fires: a
broken measurement must not pass as a clean one. A metric absent from the dict (the ratio does
not exist in this run, e.g. no engine log-probs) is not checked; ``MismatchBudget.keys`` lists
the keys a budget reads so the trainer can check at start-up that they will exist.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any


class BudgetAction(str, Enum):
    WARN = "warn"
    TIGHTEN = "tighten"
    LOWER_LR = "lower_lr"
    STOP = "stop"


class MeterRatio(str, Enum):
    ENGINE = "engine"
    STALENESS = "staleness"
    DRIFT = "drift"
    TOTAL = "total"


@dataclass(frozen=True)
class MismatchBudget:
    ratio: MeterRatio = MeterRatio.TOTAL
    """Which ratio the thresholds apply to (meter/{ratio}/...)."""
    min_ess_token: float | None = None
    """Alarm when the token-level normalised ESS falls below this (in (0, 1])."""
    min_ess_seq: float | None = None
    """Alarm when the sequence-level (product-ratio) normalised ESS falls below this (in (0, 1])."""
    max_abs_logr_p99: float | None = None
    """Alarm when the 99th percentile of |log ratio| exceeds this (> 0)."""
    max_kl: float | None = None
    """Alarm when the k3 KL estimate (meter/{ratio}/kl_k3) exceeds this (> 0)."""
    action: BudgetAction = BudgetAction.WARN
    """What the trainer does on an alarm: warn, tighten, lower_lr or stop."""

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "ratio", MeterRatio(self.ratio))
        except ValueError:
            raise ValueError(
                f"MismatchBudget.ratio must be one of {[r.value for r in MeterRatio]}, got {self.ratio!r}"
            ) from None
        try:
            object.__setattr__(self, "action", BudgetAction(self.action))
        except ValueError:
            raise ValueError(
                f"MismatchBudget.action must be one of {[a.value for a in BudgetAction]}, got {self.action!r}"
            ) from None
        for name in ("min_ess_token", "min_ess_seq"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and 0 < v <= 1):
                raise ValueError(f"MismatchBudget.{name} must be in (0, 1] or None, got {v!r}")
        for name in ("max_abs_logr_p99", "max_kl"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ValueError(f"MismatchBudget.{name} must be a finite number > 0 or None, got {v!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MismatchBudget:
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise ValueError(f"MismatchBudget has no field {unknown[0]!r}; valid: {', '.join(sorted(valid))}")
        return cls(**d)

    def rules(self) -> list[tuple[str, str, str, float]]:
        """``(field, metric key, 'min'|'max', threshold)`` for every field that is set."""
        p = f"meter/{self.ratio.value}"
        spec = [
            ("min_ess_token", f"{p}/ess_token", "min"),
            ("min_ess_seq", f"{p}/ess_seq", "min"),
            ("max_abs_logr_p99", f"{p}/abs_logr_p99", "max"),
            ("max_kl", f"{p}/kl_k3", "max"),
        ]
        return [(f, key, kind, float(getattr(self, f))) for f, key, kind in spec if getattr(self, f) is not None]

    @property
    def keys(self) -> list[str]:
        return [key for _, key, _, _ in self.rules()]


@dataclass(frozen=True)
class Alarm:
    metric: str
    """The metric key, e.g. meter/total/ess_token."""
    value: float
    threshold: float
    field: str
    """The budget field that set the threshold, e.g. min_ess_token."""
    action: BudgetAction
    owner: str = "MismatchBudget"
    """Where the threshold is configured (a budget field, or another section's, e.g. DistConfig)."""

    @property
    def message(self) -> str:
        op = "<" if self.field.startswith("min_") else ">"
        return (
            f"mismatch budget exceeded: {self.metric} = {self.value:.6g} {op} {self.threshold:g} "
            f"({self.owner}.{self.field}); action: {self.action.value}"
        )


Rule = tuple[str, str, str, float]
"""``(field, metric key, 'min'|'max', threshold)``, as ``MismatchBudget.rules`` returns them."""


def check_rules(stats: Mapping[str, Any], rules: list[Rule], action: BudgetAction,
                owner: str = "MismatchBudget") -> list[Alarm]:
    """Alarms for every rule the statistics cross: ``value < threshold`` ('min') or ``value > threshold`` ('max'),
    or a value that is NaN or infinite; a key absent from ``stats`` is not checked."""
    alarms = []
    for field_name, key, kind, threshold in rules:
        if key not in stats:
            continue
        value = float(stats[key])
        crossed = (value < threshold) if kind == "min" else (value > threshold)
        if crossed or not math.isfinite(value):
            alarms.append(Alarm(metric=key, value=value, threshold=threshold, field=field_name, action=action,
                                owner=owner))
    return alarms


def check_budget(stats: Mapping[str, Any], budget: MismatchBudget) -> list[Alarm]:
    """Alarms for every budget threshold the statistics cross (module docstring)."""
    return check_rules(stats, budget.rules(), budget.action)
