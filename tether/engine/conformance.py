"""What an engine's returned per-token log-probs are: pure functions behind ``tether engine-check``.

An engine samples ``N`` completion tokens ``x_1 .. x_N`` after a prompt and returns one number
``r_i`` per token. Tether needs ``r_i = log mu(x_i | x_<i)``, the log-probability under the
distribution the engine actually sampled from (after temperature ``tau``, top-k, top-p:
:func:`tether.engine.sampling.sampling_logprobs`). Engines differ (the bugs seen in the wild: raw
logits instead of processed ones, a value one position off), so the check does not trust a name
or a flag: it recomputes, from the model's own logits on the engine's own tokens, every candidate

* ``sampled``:  ``log mu_i(x_i)`` with ``mu_i`` the tempered, truncated distribution at step ``i``;
* ``tempered``: ``log softmax(z_i / tau)(x_i)`` (temperature, no truncation);
* ``raw``:      ``log softmax(z_i)(x_i)`` (the model's logits untouched);
* ``<c>-shift-prev``: ``c`` of the previous token, ``c_{i-1}(x_{i-1})`` (undefined at ``i = 1``), and
  ``<c>-shift-next``: ``c_{i+1}(x_{i+1})`` (undefined at ``i = N``), for ``c`` in ``sampled`` and ``raw``;

and :func:`classify_logprobs` names the one whose ``max_i |r_i - c_i|`` is within the tolerance.
Undefined entries are NaN and left out of the maximum; ``r_i = c_i = -inf`` counts as equal.
Only ``torch`` is imported.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from tether.engine.sampling import sampling_logprobs

SAMPLED = "sampled"
"""The candidate tether requires: the log-probs of the distribution actually sampled from."""
NONE = "none"
"""No candidate is within the tolerance."""
AMBIGUOUS = "ambiguous"
"""More than one candidate is within the tolerance (the sampling transform does not separate them)."""


@dataclass(frozen=True)
class Verdict:
    """The outcome of :func:`classify_logprobs`."""

    kind: str
    """The one candidate within tolerance, :data:`NONE` or :data:`AMBIGUOUS`."""
    max_abs_diff: dict[str, float]
    """``max_i |r_i - c_i|`` per candidate over its defined entries (``inf`` if it has none)."""
    matches: tuple[str, ...]
    """Every candidate within tolerance, closest first."""


def max_abs_diff(returned_x: Tensor, candidate_x: Tensor) -> float:
    """``max |r - c|`` over the entries where ``c`` is defined (not NaN); equal values (both ``-inf``
    included) differ by 0; ``inf`` when no entry is defined."""
    if returned_x.shape != candidate_x.shape:
        raise ValueError(f"max_abs_diff: returned shape {tuple(returned_x.shape)} != candidate shape "
                         f"{tuple(candidate_x.shape)}")
    r, c = returned_x.double(), candidate_x.double()
    defined = ~torch.isnan(c)
    if not bool(defined.any()):
        return float("inf")
    d = torch.where(r == c, torch.zeros_like(r), (r - c).abs())
    d = torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d)  # a NaN returned value never matches
    return float(d[defined].max())


def classify_logprobs(returned_x: Tensor, candidates: Mapping[str, Tensor], *, tol: float) -> Verdict:
    """Which candidate the returned log-probs are.

    ``d_c = max_{i: c_i defined} |r_i - c_i|`` for every candidate ``c``; the verdict is the unique
    ``c`` with ``d_c <= tol``, :data:`AMBIGUOUS` when several are, :data:`NONE` when none is.
    """
    if not tol >= 0:
        raise ValueError(f"classify_logprobs: tol must be >= 0, got {tol}")
    if not candidates:
        raise ValueError("classify_logprobs: no candidates")
    diffs = {name: max_abs_diff(returned_x, c) for name, c in candidates.items()}
    matches = tuple(sorted((n for n, d in diffs.items() if d <= tol), key=lambda n: diffs[n]))
    kind = matches[0] if len(matches) == 1 else (NONE if not matches else AMBIGUOUS)
    return Verdict(kind=kind, max_abs_diff=diffs, matches=matches)


def _shifts(name: str, c_BN: Tensor) -> dict[str, Tensor]:
    nan_B1 = torch.full_like(c_BN[:, :1], float("nan"))
    return {f"{name}-shift-prev": torch.cat([nan_B1, c_BN[:, :-1]], 1),
            f"{name}-shift-next": torch.cat([c_BN[:, 1:], nan_B1], 1)}


def candidate_logprobs(logits_BNV: Tensor, tokens_BN: Tensor, *, temperature: float, top_k: int | None = None,
                       top_p: float | None = None) -> dict[str, Tensor]:
    """Every candidate of the module docstring, each ``[B, N]``, from the ``N`` sampled tokens
    ``tokens_BN`` and the model's teacher-forced logits ``logits_BNV[:, i]`` that predict ``tokens_BN[:, i]``."""
    if logits_BNV.dim() != 3 or tokens_BN.shape != logits_BNV.shape[:2]:
        raise ValueError(f"candidate_logprobs: logits {tuple(logits_BNV.shape)} must be [B, N, V] with tokens "
                         f"{tuple(tokens_BN.shape)} = [B, N]")
    if tokens_BN.shape[1] < 2:
        raise ValueError("candidate_logprobs: need at least two tokens per row (a shift needs a neighbour)")
    z = logits_BNV.float()
    idx = tokens_BN[..., None]
    sampled_BN = sampling_logprobs(z, temperature, top_k, top_p)[0].gather(-1, idx)[..., 0]
    raw_BN = torch.log_softmax(z, dim=-1).gather(-1, idx)[..., 0]
    out = {SAMPLED: sampled_BN, "tempered": torch.log_softmax(z / temperature, dim=-1).gather(-1, idx)[..., 0],
           "raw": raw_BN}
    out.update(_shifts(SAMPLED, sampled_BN))
    out.update(_shifts("raw", raw_BN))
    return out
