"""The result of a run in sentences: held-out accuracy with its standard error, reward early vs late, and a
one-line verdict on policy mismatch that separates float rounding from a real mismatch.

Shared by the end-of-run summary (``tether train``), ``tether report`` and the run's PNGs, so the three say
the same thing. Pure Python (no torch, no plotting): every function takes numbers and returns numbers or text.

The float floor. An fp32 engine and an fp32 trainer computing the same log-probability differ by rounding
only: on the built-in model ``|log pi_old - log mu|`` is about 2e-7 nats per token (max 7e-7), the KL about
4e-14. ``FLOAT_FLOOR[precision]`` is a generous bound of that noise per token for the engine's numerics
(fp32 1e-5; fp16 and bf16 cast weights and activations, so their rounding is the floor: about their unit
roundoff times a few, 2e-3 and 1.6e-2). int8 fake-quantises the weights but computes in fp32, so its floor is
fp32's: quantisation error is a mismatch, not noise. A KL at float level is at most ``floor**2``
(``KL ~ E[z^2] / 2 <= max|z|^2``).
"""

from __future__ import annotations

import math

FLOAT_FLOOR = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1.6e-2, "int8": 1e-5}
"""Per-token |log r| (nats) below which a mismatch is float rounding, by the engine's ``rollout_precision``."""


def float_floor(precision: str | None) -> float:
    """The per-token float-noise floor of ``precision`` (fp32's when unknown or absent)."""
    return FLOAT_FLOOR.get(str(precision or "fp32").lower(), FLOAT_FLOOR["fp32"])


def accuracy_standard_error(p: float, n: int) -> float:
    """Standard error of an accuracy ``p`` measured on ``n`` problems: ``sqrt(p (1 - p) / n)`` (the binomial
    proportion's; 0 for n = 0 is never returned: n must be positive)."""
    if n <= 0:
        raise ValueError(f"accuracy_standard_error: n must be positive, got {n}")
    return math.sqrt(max(p * (1.0 - p), 0.0) / n)


def difference_standard_error(before: float, after: float, n: int) -> float:
    """Standard error of ``after - before``, two accuracies on the same ``n`` problems, treated as independent:
    ``sqrt(SE(before)^2 + SE(after)^2)`` (conservative when the two evaluations are positively correlated,
    as they are on one held-out set)."""
    return math.hypot(accuracy_standard_error(before, n), accuracy_standard_error(after, n))


def _pct(p: float) -> str:
    return f"{100 * p:.1f} %"


def accuracy_sentence(before: float | None, after: float | None, n: int | None, episodes: bool = False) -> str | None:
    """``held-out accuracy 31.0 % -> 44.5 % (+13.5 points, standard error 4.8 points, 200 problems)``; an
    environment's (``episodes``): ``held-out success rate ... 20 episodes``."""
    if before is None or after is None:
        return None
    what, unit = ("success rate", "episodes") if episodes else ("accuracy", "problems")
    text = f"held-out {what} {_pct(before)} -> {_pct(after)} ({100 * (after - before):+.1f} points"
    if n:
        text += f", standard error {100 * difference_standard_error(before, after, n):.1f} points, {n} {unit}"
    return text + ")"


def reward_sentence(first: float | None, last: float | None) -> str | None:
    """``mean reward 0.12 in the first quarter of steps, 0.45 in the last (+0.33)``."""
    if first is None or last is None:
        return None
    return f"mean reward {first:.3g} in the first quarter of steps, {last:.3g} in the last ({last - first:+.3g})"


def mismatch_verdict(engine: float | None, kl: float | None, precision: str | None = "fp32",
                     staleness: float | None = None) -> tuple[bool, str] | None:
    """``(beyond_noise, sentence)`` from the run's mean per-token ``|log r|`` of the engine (nats), its KL and,
    in async runs, the staleness part's ``|log r|``. Below the floor (``float_floor(precision)`` for |log r|,
    its square for the KL) the mismatch is float rounding: ``no mismatch beyond float noise``. None when
    the run measured nothing."""
    if engine is None and kl is None and staleness is None:
        return None
    floor = float_floor(precision)
    prec = str(precision or "fp32")
    vals = [v for v in (engine, staleness) if v is not None]
    finite = all(math.isfinite(v) for v in vals + ([kl] if kl is not None else []))
    noise = finite and all(abs(v) <= floor for v in vals) and (kl is None or abs(kl) <= floor ** 2)
    measured = []
    if engine is not None:
        measured.append(f"|log r| {engine:.2g} nats/token")
    if kl is not None:
        measured.append(f"KL {kl:.2g}")
    if noise:
        return False, (f"no mismatch beyond float noise ({', '.join(measured)}; the {prec} floor is "
                       f"{floor:.0e} nats/token)")
    parts = []
    if engine is not None:
        parts.append(f"engine mismatch {engine:.3g} nats/token")
    if staleness is not None:
        parts.append(f"staleness {staleness:.3g} nats/token")
    if kl is not None:
        parts.append(f"KL {kl:.3g}")
    return True, ", ".join(parts) + f" (above the {prec} float floor of {floor:.0e} nats/token)"


def quarter_means(values: list[float]) -> tuple[float | None, float | None]:
    """Means of the first and the last quarter of ``values`` (at least one value each; NaNs left out)."""
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return None, None
    n = max(len(vals) // 4, 1)
    return sum(vals[:n]) / n, sum(vals[-n:]) / n


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    s = int(round(seconds))
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"
