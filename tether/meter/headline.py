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


def run_mean(records: list[dict], key: str) -> float | None:
    """Mean of the finite numbers under ``key`` over a run's metric rows (None when no row has one)."""
    vals = [r[key] for r in records if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
            and math.isfinite(r[key])]
    return sum(vals) / len(vals) if vals else None


def _ess_of_weights(mean: float, std: float) -> float:
    """Normalised ESS ``(sum w)^2 / (n sum w^2) = m^2 / (m^2 + s^2)`` of weights with mean ``m`` and population
    standard deviation ``s`` (1 when both are 0: no weight, no evidence of degeneracy)."""
    den = mean * mean + std * std
    return mean * mean / den if den > 0 else 1.0


def correction_prefix(records: list[dict]) -> str | None:
    """The prefix ``P`` of the objective's mismatch-correction weight, the first under which rows log both
    ``P/weight_mean`` and ``P/weight_std`` (``tis``, ``icepop``, ``infer``, ...); None for an objective without
    one (GRPO: no importance weight)."""
    for row in records:
        for key in row:
            if key.endswith("/weight_mean") and key.count("/") == 1:
                prefix = key.rsplit("/", 1)[0]
                if f"{prefix}/weight_std" in row:
                    return prefix
    return None


def mismatch_numbers(records: list[dict], old_logits: str | None = None) -> dict[str, float | str]:
    """The run's mismatch and what its correction did, as run means (summary.json keys; only those measured).

    ``mismatch/*``: the mean per-token ``|log r|`` of the total ratio pi_old(current)/mu, of its engine part
    pi_old(v)/mu and of its staleness part pi_old(current)/pi_old(v), and the variance shares of the exact
    split (``meter/decomp``: engine + staleness + cross = 1 on every step). ``correction/*``: the correction
    weight's prefix, the share of loss tokens whose weight was truncated (``clipfrac_*``) or masked
    (``maskfrac_*``), and the ESS per token of the ratio it corrects before (the meter's: the engine ratio when
    ``old_logits`` is snapshot, whose pi_old is the token's own version, else the total) and of the weights
    after (``_ess_of_weights`` of each step's weight mean and spread)."""
    out: dict[str, float | str] = {}
    for name, key in (("total", "meter/total/abs_logr_mean"), ("engine", "meter/engine/abs_logr_mean"),
                      ("staleness", "meter/staleness/abs_logr_mean"), ("total_kl", "meter/total/kl_k3"),
                      ("age_mean", "meter/version/age_mean"),
                      ("engine_share", "meter/decomp/engine/var_share"),
                      ("staleness_share", "meter/decomp/staleness/var_share"),
                      ("cross_share", "meter/decomp/cross/var_share")):
        v = run_mean(records, key)
        if v is not None:
            out[f"mismatch/{name}"] = v
    prefix = correction_prefix(records)
    if prefix is None:
        return out
    out["correction/prefix"] = prefix
    for name, parts in (("truncated", ("clipfrac_high", "clipfrac_low")), ("masked", ("maskfrac_high", "maskfrac_low"))):
        vals = [run_mean(records, f"{prefix}/{p}") for p in parts]
        if any(v is not None for v in vals):
            out[f"correction/{name}_frac"] = sum(v for v in vals if v is not None)
    ratio = "engine" if str(old_logits or "") == "snapshot" else "total"
    before = run_mean(records, f"meter/{ratio}/ess_token")
    after = [_ess_of_weights(r[f"{prefix}/weight_mean"], r[f"{prefix}/weight_std"]) for r in records
             if isinstance(r.get(f"{prefix}/weight_mean"), (int, float)) and isinstance(r.get(f"{prefix}/weight_std"),
                                                                                         (int, float))]
    if before is not None:
        out["correction/ess_before"] = before
    if after:
        out["correction/ess_after"] = sum(after) / len(after)
    return out


def _share(v: float) -> str:
    return f"{100 * v:.0f} %"


def decomposition_sentence(numbers: dict, precision: str | None = "fp32") -> str | None:
    """``mismatch pi_old/mu 0.031 nats/token (KL 0.0012): from the int8 engine 0.028 nats/token, from staleness
    (tokens 1 version old on average) 0.011; of its variance 78 % engine, 19 % staleness, 3 % cross term`` from
    ``mismatch_numbers``; None when the run measured no total ratio."""
    total = numbers.get("mismatch/total")
    if total is None:
        return None
    text = f"mismatch pi_old/mu {total:.3g} nats/token"
    if numbers.get("mismatch/total_kl") is not None:
        text += f" (KL {numbers['mismatch/total_kl']:.2g})"
    parts = []
    if numbers.get("mismatch/engine") is not None:
        parts.append(f"from the {precision or 'fp32'} engine {numbers['mismatch/engine']:.3g} nats/token")
    if numbers.get("mismatch/staleness") is not None:
        age = numbers.get("mismatch/age_mean")
        behind = f" (tokens {age:.2g} version{'' if age == 1 else 's'} old on average)" if age is not None else ""
        parts.append(f"from staleness{behind} {numbers['mismatch/staleness']:.3g}")
    if parts:
        text += ": " + ", ".join(parts)
    shares = [numbers.get(f"mismatch/{p}_share") for p in ("engine", "staleness", "cross")]
    if all(v is not None for v in shares):
        text += (f"; of its variance {_share(shares[0])} engine, {_share(shares[1])} staleness, "
                 f"{_share(shares[2])} cross term")
        if shares[2] < 0:
            text += " (the two parts partly cancel)"
    elif numbers.get("mismatch/age_mean"):
        text += "; engine and staleness not separated (old_logits snapshot separates them)"
    return text


def correction_sentence(numbers: dict, objective: str | None) -> str:
    """``correction tis: weight truncated on 0.4 % of tokens, the other 99.6 % reweighted by pi_old/mu; ESS per
    token 0.962 before, 0.968 after`` from ``mismatch_numbers``; an objective without a correction weight:
    ``no mismatch correction: objective grpo logged no importance weight on pi_old/mu``."""
    prefix = numbers.get("correction/prefix")
    if prefix is None:
        return f"no mismatch correction: objective {objective} logged no importance weight on pi_old/mu"
    cut = [f"weight truncated on {100 * numbers[k]:.2g} % of tokens" if k.endswith("truncated_frac") else
           f"tokens masked {100 * numbers[k]:.2g} %" for k in ("correction/truncated_frac", "correction/masked_frac")
           if k in numbers]
    untouched = 1.0 - sum(numbers.get(k, 0.0) for k in ("correction/truncated_frac", "correction/masked_frac"))
    text = f"correction {objective}{'' if prefix == objective else f' ({prefix})'}: " + ", ".join(cut)
    text += f"{', the other' if cut else ''} {100 * untouched:.4g} % reweighted by pi_old/mu"
    ess = [numbers.get(k) for k in ("correction/ess_before", "correction/ess_after")]
    if all(v is not None for v in ess):
        text += f"; ESS per token {ess[0]:.5g} before, {ess[1]:.5g} after"
    return text
