"""Length-calibrated sequence thresholds: a bound on the product ratio that means the same at every length.

A sequence-level mask or cap compares ``S_i = sum_t m_t delta_t`` (``delta_t = log pi_old(y_t) - log mu(y_t)``,
the log of the product ratio ``pi_old(y) / mu(y)``) with a log bound ``log B``. A fixed ``B`` means something
different at length 10 and at length 1000, because ``S`` accumulates per-token mismatch. Here the bound is given at a
reference length ``T0`` (``ref_len``) and moved to each row's own length ``T_i = sum_t m_t``:

    none:  log B(T) = log B0
    geo:   log B(T) = (T / T0) log B0
    sqrt:  log B(T) = m T + sqrt(T / T0) (log B0 - m T0)          (m = ``drift``, default 0)

At ``T = T0`` every rule gives ``B0``. An infinite bound (a cap of ``inf``, a floor of ``0``) stays infinite.

Derivation (docs/objectives_notes/length_calibration.md). Model the per-token log-ratios of a sequence drawn from
``mu`` as i.i.d. with mean ``m`` and variance ``s^2``. Then ``E S_T = T m`` and ``sd S_T = s sqrt(T)``, and for
large ``T`` ``S_T`` is close to ``N(T m, T s^2)``. The ``mu``-mass a bound keeps, ``P(S_T <= log B)``, is the same
at every ``T`` iff the standardised bound ``(log B(T) - T m) / (s sqrt(T))`` is constant. That gives the ``sqrt``
rule. With ``m = 0`` it is ``log B0 sqrt(T / T0)``. The ``geo`` rule instead fixes the bound on the per-token mean
``S_T / T``; it tests the drift, not the noise. It is the band of ``level="geometric"`` applied to the product ratio
(geometric rejection with sequence-ratio weights). Two exact facts bound ``m``. First,
``E_mu[delta_t | prefix] = -KL(mu || pi_old)(prefix) <= 0``, so ``m`` is minus the mean per-token KL (the meter's
``mismatch/kl_k1`` estimates it). Second, ``E_mu[exp(S_T)] = 1``, the product ratio being a mean-one martingale.
That forces ``m = -s^2 / 2`` if ``delta`` is Gaussian, and ``m ~ -s^2 / 2`` for small mismatch. So the drift
dominates the noise (``|T m| > s sqrt(T)``) only beyond ``T ~ 4 / s^2 = 2 / KL``.

Pure functions of tensors; the bounds are detached ``[B]`` tensors (they depend on the mask only).
"""

from __future__ import annotations

import math
from enum import Enum

import torch
from torch import Tensor

from tether.objectives.aggregation import parse_choice


class LengthCalibration(str, Enum):
    NONE = "none"
    GEO = "geo"
    SQRT = "sqrt"

    @classmethod
    def parse(cls, value: str | LengthCalibration) -> LengthCalibration:
        return parse_choice(cls, value, "length_calibration")


def check_length_calibration(
    length_calibration: str | LengthCalibration, ref_len: float | None, length_drift: float, *, level: str
) -> LengthCalibration:
    """The parsed rule, or a ``ValueError`` naming the hyper-parameter: a rule other than ``none`` needs
    ``level="sequence"`` (a token ratio does not accumulate with length, and a geometric-mean ratio is already
    length-normalised) and a finite ``ref_len > 0``; ``length_drift`` must be finite and is only read by ``sqrt``."""
    cal = LengthCalibration.parse(length_calibration)
    drift = float(length_drift)
    if not math.isfinite(drift):
        raise ValueError(f"length_drift must be a finite per-token log-ratio, got {length_drift}")
    if cal is LengthCalibration.NONE:
        if drift != 0.0:
            raise ValueError("length_drift is read by length_calibration 'sqrt' only; length_calibration is 'none'")
        return cal
    if level != "sequence":
        raise ValueError(f"length_calibration '{cal.value}' needs level 'sequence' (the product ratio), got level "
                         f"'{level}': a token ratio does not grow with length and a geometric mean is already "
                         "length-normalised")
    if ref_len is None or isinstance(ref_len, bool) or not (math.isfinite(float(ref_len)) and float(ref_len) > 0):
        raise ValueError(f"length_calibration '{cal.value}' needs ref_len, the length (in loss tokens, > 0) at which "
                         f"the bounds are meant; got {ref_len!r}")
    if cal is LengthCalibration.GEO and drift != 0.0:
        raise ValueError("length_drift is read by length_calibration 'sqrt' only (the 'geo' rule is linear in "
                         "the length already)")
    return cal


def length_factor(len_B: Tensor, length_calibration: str | LengthCalibration, ref_len: float | None) -> Tensor:
    """``f(T) = 1`` (none), ``T / T0`` (geo) or ``sqrt(T / T0)`` (sqrt), per row, float64 ``[B]``."""
    cal = LengthCalibration.parse(length_calibration)
    T = len_B.detach().to(torch.float64)
    if cal is LengthCalibration.NONE:
        return torch.ones_like(T)
    assert ref_len is not None
    x = T / float(ref_len)
    return x if cal is LengthCalibration.GEO else x.sqrt()


def calibrated_log_bound(
    log_bound: float,
    len_B: Tensor,
    *,
    length_calibration: str | LengthCalibration,
    ref_len: float | None,
    length_drift: float = 0.0,
) -> Tensor:
    """``log B(T_i)`` per row (module doc), float64 ``[B]``.

    none: ``log B0``; geo: ``(T/T0) log B0``; sqrt: ``m T + sqrt(T/T0) (log B0 - m T0)``. ``log B0 = +-inf``
    gives ``+-inf`` at every length (also at ``T = 0``, where a finite bound becomes ``m * 0 + 0 = 0``)."""
    cal = LengthCalibration.parse(length_calibration)
    T = len_B.detach().to(torch.float64)
    if math.isinf(log_bound) or cal is LengthCalibration.NONE:
        return torch.full_like(T, log_bound)
    f = length_factor(T, cal, ref_len)
    if cal is LengthCalibration.GEO:
        return f * log_bound
    assert ref_len is not None
    m = float(length_drift)
    return m * T + f * (log_bound - m * float(ref_len))


def bound_range_metrics(log_bound_B: Tensor, has_B: Tensor, name: str) -> dict[str, Tensor]:
    """``{name}_min`` / ``{name}_max``: the smallest and largest calibrated log bound over rows with a loss
    token (0 when there is none), float64, without a host sync; only finite bounds are passed here."""
    with torch.no_grad():
        b = log_bound_B.detach().to(torch.float64)
        zero = torch.zeros((), dtype=torch.float64, device=b.device)
        if b.numel() == 0:
            return {f"{name}_min": zero, f"{name}_max": zero.clone()}
        lo = torch.where(has_B, b, math.inf).amin()
        hi = torch.where(has_B, b, -math.inf).amax()
        any_row = has_B.any()
        return {f"{name}_min": torch.where(any_row, lo, zero), f"{name}_max": torch.where(any_row, hi, zero)}
