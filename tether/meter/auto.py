"""The ``auto`` correction mode: choose the correction level and its threshold from the meter.

A pure function of the step's meter statistics (docs/meter.md "The auto rule", where the rule is
justified by exact bias / variance on an enumerable chain: benchmarks/meter_auto_rule.py):

1. Guard. If any token's |log r| exceeds ``catastrophic_log_ratio`` (default log 1e4, ROLL's
   catastrophic-reject level), the ratio carries broken numerics rather than a distribution shift:
   choose ``GEOMETRIC`` rejection, dropping sequences whose |mean_t log r| exceeds
   ``tau = clamp(geo_mult * median_i |mean_t log r_i|, geo_min, geo_max)``. (A heuristic: the chain
   experiment has no broken tokens, so it cannot score this branch.)
2. Level. ``SEQUENCE`` (truncated product ratio) when ``n_seqs * ess_seq >= min_effective_seqs``
   (default 64), else ``TOKEN`` (truncated per-token ratio). Sequence IS is unbiased but its variance
   grows with chi^2 of the product ratio; token IS has low variance but is biased by the ignored
   prefix shift. Bias does not shrink with the batch, variance does, so the effective number of
   sequences, not the ESS alone, decides (measured: docs/meter.md).
3. Threshold. The cap is ``clamp(exp(p99), cap_min, cap_max)`` of the chosen level's log-ratio
   (token ``logr_p99``, sequence ``seq_logr_p99``), so about 1 % of weights are truncated; cap range
   [2, 10] (TIS practice: 1.5-5 token, 2-10 sequence).

Empty batches (``n_tokens == 0``) get ``TOKEN`` with ``cap_min``: nothing to correct.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any


class CorrectionLevel(str, Enum):
    TOKEN = "token"
    """w_t = min(pi_old(y_t)/mu(y_t), C) per token."""
    SEQUENCE = "sequence"
    """w = min(prod_t pi_old(y_t)/mu(y_t), C), broadcast over the sequence."""
    GEOMETRIC = "geometric"
    """Reject sequences with |mean_t log(pi_old(y_t)/mu(y_t))| > tau."""


@dataclass(frozen=True)
class CorrectionDecision:
    level: CorrectionLevel
    threshold: float
    """The cap C for TOKEN / SEQUENCE (a ratio >= 1), tau for GEOMETRIC (a log-ratio > 0)."""
    reason: str
    """One line naming the statistics and the thresholds that decided."""


@dataclass(frozen=True)
class AutoRule:
    min_effective_seqs: float = 64.0
    """Choose SEQUENCE when n_seqs * ess_seq reaches this (calibrated: docs/meter.md)."""
    cap_min: float = 2.0
    """Lower bound of the truncation cap."""
    cap_max: float = 10.0
    """Upper bound of the truncation cap."""
    catastrophic_log_ratio: float = math.log(1e4)
    """|log r| beyond this on any token switches to GEOMETRIC rejection."""
    geo_mult: float = 3.0
    """GEOMETRIC tau = geo_mult * median |mean log r| ..."""
    geo_min: float = 1e-3
    """... clamped to [geo_min, geo_max]."""
    geo_max: float = math.log(2.0)

    def __post_init__(self) -> None:
        if not self.min_effective_seqs > 0:
            raise ValueError(f"AutoRule.min_effective_seqs must be > 0, got {self.min_effective_seqs}")
        if not 1.0 <= self.cap_min <= self.cap_max:
            raise ValueError(f"AutoRule.cap_min/cap_max must satisfy 1 <= cap_min <= cap_max, got {self.cap_min}, {self.cap_max}")
        if not self.catastrophic_log_ratio > 0:
            raise ValueError(f"AutoRule.catastrophic_log_ratio must be > 0, got {self.catastrophic_log_ratio}")
        if not 0 < self.geo_min <= self.geo_max:
            raise ValueError(f"AutoRule.geo_min/geo_max must satisfy 0 < geo_min <= geo_max, got {self.geo_min}, {self.geo_max}")
        if not self.geo_mult > 0:
            raise ValueError(f"AutoRule.geo_mult must be > 0, got {self.geo_mult}")


def _get(stats: Mapping[str, Any], key: str) -> float:
    if key not in stats:
        raise ValueError(f"auto correction needs the meter statistic {key!r}, which is not in the metrics")
    return float(stats[key])


def choose_correction(stats: Mapping[str, Any], rule: AutoRule = AutoRule(), *, ratio: str = "total") -> CorrectionDecision:
    """The correction level and threshold for this step (module docstring), read from ``meter/{ratio}/...``.

    ``ratio`` names the ratio being corrected: ``total`` when measured before the update (then it
    is pi_old/mu), or ``engine`` to correct only the same-version engine discrepancy.
    """
    p = f"meter/{ratio}"
    n_tokens = _get(stats, f"{p}/n_tokens")
    if n_tokens == 0:
        return CorrectionDecision(CorrectionLevel.TOKEN, rule.cap_min, "empty batch: nothing to correct")
    abs_max = _get(stats, f"{p}/abs_logr_max")
    if not math.isfinite(abs_max) or abs_max > rule.catastrophic_log_ratio:
        med = _get(stats, f"{p}/geo_abs_logr_p50")
        tau = min(max(rule.geo_mult * med, rule.geo_min), rule.geo_max)
        return CorrectionDecision(
            CorrectionLevel.GEOMETRIC,
            tau,
            f"{p}/abs_logr_max = {abs_max:.4g} > {rule.catastrophic_log_ratio:.4g} (broken tokens): reject sequences "
            f"with |mean log r| > {tau:.4g} = clamp({rule.geo_mult:g} x median {med:.4g}, {rule.geo_min:g}, {rule.geo_max:.4g})",
        )
    n_seqs = _get(stats, f"{p}/n_seqs")
    ess_seq = _get(stats, f"{p}/ess_seq")
    eff = n_seqs * ess_seq
    if eff >= rule.min_effective_seqs:
        q99 = _get(stats, f"{p}/seq_logr_p99")
        cap = min(max(math.exp(min(q99, 700.0)), rule.cap_min), rule.cap_max)
        return CorrectionDecision(
            CorrectionLevel.SEQUENCE,
            cap,
            f"n_seqs x ess_seq = {n_seqs:.0f} x {ess_seq:.4g} = {eff:.4g} >= {rule.min_effective_seqs:g}: sequence IS, "
            f"cap = clamp(exp(seq_logr_p99 = {q99:.4g}), {rule.cap_min:g}, {rule.cap_max:g}) = {cap:.4g}",
        )
    q99 = _get(stats, f"{p}/logr_p99")
    cap = min(max(math.exp(min(q99, 700.0)), rule.cap_min), rule.cap_max)
    return CorrectionDecision(
        CorrectionLevel.TOKEN,
        cap,
        f"n_seqs x ess_seq = {n_seqs:.0f} x {ess_seq:.4g} = {eff:.4g} < {rule.min_effective_seqs:g}: token IS, "
        f"cap = clamp(exp(logr_p99 = {q99:.4g}), {rule.cap_min:g}, {rule.cap_max:g}) = {cap:.4g}",
    )
