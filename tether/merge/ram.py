"""RAM, Reinforced Agent Merging (arXiv 2601.13572, "Behavior Knowledge Merge in Reinforced Agentic
Models"), and plain task-vector averaging: pure functions of tensors, torch only.

Notation (``shared/methods.md`` §6 (d)6, read from the authors' ``ram-main.py``). A base model ``θ_0`` and
``N`` fine-tuned models ``θ_j`` with the same parameter names and shapes. For every parameter tensor:

* task vector ``τ_j = θ_j − θ_0``;
* changed mask ``M_j = |τ_j| > t`` elementwise (threshold ``t``, default ``1e-5``);
* change count ``c = Σ_j M_j`` (how many models changed each coordinate);
* a coordinate is **shared** when ``c ≥ 2``, **unique** when ``c = 1``, untouched when ``c = 0``.

Merges (output ``θ = θ_0 + Δ``, elementwise):

* ``average`` (task arithmetic with weight ``1/N``, the baseline): ``Δ = (1/N) Σ_j τ_j``. A coordinate only
  one model changed is divided by ``N`` ("dilution", the failure RAM targets).
* ``ram`` ("arm" in the authors' code): ``Δ = Σ_j M_j τ_j / max(c, 1)``: each coordinate is the mean over
  only the models that changed it, so a unique coordinate keeps its full value and an untouched one stays
  at the base. Changes of magnitude ``≤ t`` are dropped (they are not "changed").
* ``ram-plus`` (RAM+, "arm-r-v2", the authors' default): as ``ram`` on shared coordinates; on unique ones
  ``Δ = Σ_j λ_j M_j τ_j`` with one rescale factor per model,
  ``λ_j = 1 + (r − 1) · min(1, ρ_j)``, ``r ≥ 1`` (default ``1.05``), where the overlap ratio ``ρ_j`` is
  counted over the whole model (all parameters together), with ``shared_j = |M_j ∧ (c ≥ 2)|``,
  ``changed_j = |M_j|``:

  - ``ratio="unique"`` ("arm-r-v2", default): ``ρ_j = shared_j / (changed_j − shared_j)``;
  - ``ratio="changed"`` ("arm-r"): ``ρ_j = shared_j / changed_j``.

  A model whose changes overlap much with the others' gets its unique changes amplified the most
  (they are what averaging would otherwise wash out of its behaviour).

Edge cases, INFERRED where the source is silent: ``changed_j = 0`` gives ``ρ_j = 0`` (as in the source);
``changed_j = shared_j > 0`` (no unique coordinate; the source divides by zero there) gives ``ρ_j = ∞``,
``λ_j = r``, which cannot change the result since ``λ_j`` multiplies only model ``j``'s unique coordinates.
The source silently raises ``r < 1`` to 1; here ``r < 1`` is an error. With one model, every changed
coordinate is unique: ``ram`` returns ``θ_1`` up to the dropped sub-threshold changes, and ``ram-plus``
returns ``θ_0 + τ_1 · M_1`` (``ρ_1 = 0``, so ``λ_1 = 1``).

Shapes: ``deltas_N`` is the ``N`` task vectors of one parameter stacked on a leading axis, ``[N, *shape]``.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

DEFAULT_THRESHOLD = 1e-5
"""|τ| above this counts as a change (the authors' default)."""
DEFAULT_RESCALE = 1.05
"""RAM+ rescale factor ``r`` (the authors' default)."""


class MergeMethod(str, enum.Enum):
    AVERAGE = "average"
    """θ_0 + mean_j τ_j (task arithmetic, the baseline)."""
    RAM = "ram"
    """θ_0 + Σ_j M_j τ_j / max(c, 1): average where shared, keep where unique."""
    RAM_PLUS = "ram-plus"
    """RAM on shared coordinates, unique ones rescaled by λ_j."""


class OverlapRatio(str, enum.Enum):
    UNIQUE = "unique"
    """ρ_j = shared_j / (changed_j − shared_j) (the authors' default, "arm-r-v2")."""
    CHANGED = "changed"
    """ρ_j = shared_j / changed_j ("arm-r")."""


def stack_deltas(name: str, base: Tensor, models: Sequence[Tensor], labels: Sequence[str] | None = None) -> Tensor:
    """``deltas_N[j] = models[j] − base`` in float32 (float64 kept), ``[N, *base.shape]``.

    Raises ``ValueError`` naming the parameter ``name`` (and the model, by ``labels[j]``) when there is no
    model, a tensor is not floating point, or a shape differs from the base's."""
    if not models:
        raise ValueError("merge: at least one fine-tuned model is needed")
    labels = list(labels) if labels is not None else [f"model {j}" for j in range(len(models))]
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    for j, t in enumerate(models):
        if tuple(t.shape) != tuple(base.shape):
            raise ValueError(f"parameter {name!r}: {labels[j]} has shape {tuple(t.shape)}, the base has "
                             f"{tuple(base.shape)} (the models must share one architecture)")
    for label, t in [("the base", base), *zip(labels, models)]:
        if not t.is_floating_point():
            raise ValueError(f"parameter {name!r}: {label} has dtype {t.dtype}; only floating-point tensors "
                             "have task vectors")
    return torch.stack([t.to(dtype) - base.to(dtype) for t in models])


def changed_mask(deltas_N: Tensor, threshold: float = DEFAULT_THRESHOLD) -> Tensor:
    """``M_N = |τ_N| > t`` (bool, the shape of ``deltas_N``)."""
    return deltas_N.abs() > threshold


def overlap_counts(deltas_N: Tensor, threshold: float = DEFAULT_THRESHOLD) -> tuple[Tensor, Tensor]:
    """``(changed_N, shared_N)`` for one parameter: per model ``j``, ``|M_j|`` and ``|M_j ∧ (c ≥ 2)|``
    (int64 counts; sum them over parameters for the whole-model counts RAM+ uses)."""
    mask = changed_mask(deltas_N, threshold)
    shared = mask.sum(0) >= 2
    flat = mask.reshape(mask.shape[0], -1)
    return flat.sum(1), (flat & shared.reshape(1, -1)).sum(1)


def overlap_ratio(changed: int, shared: int, ratio: OverlapRatio = OverlapRatio.UNIQUE) -> float:
    """``ρ_j``: ``shared/(changed − shared)`` (``unique``) or ``shared/changed`` (``changed``);
    0 when the model changed nothing, ``inf`` when all its changes are shared (``unique`` only)."""
    ratio = OverlapRatio(ratio)
    if not 0 <= shared <= changed:
        raise ValueError(f"overlap_ratio: need 0 <= shared <= changed, got shared={shared}, changed={changed}")
    if changed == 0:
        return 0.0
    if ratio is OverlapRatio.CHANGED:
        return shared / changed
    unique = changed - shared
    return math.inf if unique == 0 else shared / unique


def rescale_factors(changed_N: Sequence[int], shared_N: Sequence[int], *, rescale: float = DEFAULT_RESCALE,
                    ratio: OverlapRatio = OverlapRatio.UNIQUE) -> list[float]:
    """``λ_j = 1 + (r − 1) · min(1, ρ_j)`` for every model (``r`` = ``rescale`` ≥ 1)."""
    if not (math.isfinite(rescale) and rescale >= 1.0):
        raise ValueError(f"rescale factor r must be a finite number >= 1, got {rescale}")
    if len(changed_N) != len(shared_N):
        raise ValueError(f"rescale_factors: {len(changed_N)} changed counts but {len(shared_N)} shared counts")
    return [1.0 + (rescale - 1.0) * min(1.0, overlap_ratio(int(c), int(s), ratio))
            for c, s in zip(changed_N, shared_N)]


def average_delta(deltas_N: Tensor) -> Tensor:
    """``Δ = (1/N) Σ_j τ_j`` (task-vector averaging)."""
    return deltas_N.mean(0)


def ram_delta(deltas_N: Tensor, threshold: float = DEFAULT_THRESHOLD) -> Tensor:
    """``Δ = Σ_j M_j τ_j / max(c, 1)``: the mean over the models that changed each coordinate."""
    mask = changed_mask(deltas_N, threshold)
    count = mask.sum(0).clamp(min=1).to(deltas_N.dtype)
    return (deltas_N * mask).sum(0) / count


def ram_plus_delta(deltas_N: Tensor, lambdas_N: Sequence[float] | Tensor,
                   threshold: float = DEFAULT_THRESHOLD) -> Tensor:
    """``Δ = Σ_j M_j τ_j / c`` where ``c ≥ 2``; ``Σ_j λ_j M_j τ_j`` where ``c = 1``; 0 where ``c = 0``."""
    lam = torch.as_tensor(lambdas_N, dtype=deltas_N.dtype, device=deltas_N.device)
    if lam.shape != (deltas_N.shape[0],):
        raise ValueError(f"ram_plus_delta: {tuple(lam.shape)} rescale factors for {deltas_N.shape[0]} task vectors")
    mask = changed_mask(deltas_N, threshold)
    count = mask.sum(0)
    kept = deltas_N * mask
    shared = kept.sum(0) / count.clamp(min=1).to(deltas_N.dtype)
    unique = (kept * lam.reshape((-1,) + (1,) * (deltas_N.dim() - 1))).sum(0)
    return torch.where(count >= 2, shared, unique)  # c = 0: `unique` is a sum of zeros


@dataclass(frozen=True)
class OverlapStats:
    """Whole-model change statistics of one fine-tuned model (over every merged parameter)."""

    total: int
    """Coordinates (elements) in the merged parameters."""
    changed: int
    """``|M_j|``: coordinates this model changed by more than the threshold."""
    shared: int
    """``|M_j ∧ (c ≥ 2)|``: of those, coordinates at least one other model also changed."""

    @property
    def unique(self) -> int:
        """Coordinates only this model changed."""
        return self.changed - self.shared

    @property
    def changed_fraction(self) -> float:
        return self.changed / self.total if self.total else 0.0

    @property
    def shared_fraction(self) -> float:
        """Shared share of this model's changes (0 when it changed nothing)."""
        return self.shared / self.changed if self.changed else 0.0

    @property
    def unique_fraction(self) -> float:
        return self.unique / self.changed if self.changed else 0.0


def overlap_stats(named_deltas: Iterable[tuple[str, Tensor]], n_models: int,
                  threshold: float = DEFAULT_THRESHOLD) -> list[OverlapStats]:
    """Per model, the counts summed over ``(name, deltas_N)`` pairs (each ``[n_models, *shape]``)."""
    total, changed, shared = 0, torch.zeros(n_models, dtype=torch.int64), torch.zeros(n_models, dtype=torch.int64)
    for name, deltas_N in named_deltas:
        if deltas_N.shape[0] != n_models:
            raise ValueError(f"parameter {name!r}: {deltas_N.shape[0]} task vectors, expected {n_models}")
        c, s = overlap_counts(deltas_N, threshold)
        changed += c.cpu()
        shared += s.cpu()
        total += deltas_N[0].numel()
    return [OverlapStats(total=total, changed=int(c), shared=int(s)) for c, s in zip(changed, shared)]


def merge_delta(deltas_N: Tensor, method: MergeMethod, *, threshold: float = DEFAULT_THRESHOLD,
                lambdas_N: Sequence[float] | None = None) -> Tensor:
    """``Δ`` of one parameter by ``method`` (``ram-plus`` needs the model-level ``lambdas_N``)."""
    method = MergeMethod(method)
    if method is MergeMethod.AVERAGE:
        return average_delta(deltas_N)
    if method is MergeMethod.RAM:
        return ram_delta(deltas_N, threshold)
    if lambdas_N is None:
        raise ValueError("ram-plus needs the per-model rescale factors (rescale_factors of the overlap_stats)")
    return ram_plus_delta(deltas_N, lambdas_N, threshold)


def merge_state_dicts(base: Mapping[str, Tensor], models: Sequence[Mapping[str, Tensor]], method: MergeMethod, *,
                      threshold: float = DEFAULT_THRESHOLD, rescale: float = DEFAULT_RESCALE,
                      ratio: OverlapRatio = OverlapRatio.UNIQUE, labels: Sequence[str] | None = None,
                      on_param: Callable[[str, str], None] | None = None,
                      ) -> tuple[dict[str, Tensor], list[OverlapStats], list[float]]:
    """``(merged, stats, lambdas)``: ``merged[name] = θ_0 + Δ`` in the base's dtype for every parameter of
    ``base``; the per-model :class:`OverlapStats`; the RAM+ factors ``λ_j`` (all 1.0 for the other methods).

    Every model must have exactly the base's parameter names (``ValueError`` naming the parameter and the
    model otherwise). Tensors are read parameter by parameter, twice for ``ram-plus`` (counts, then merge),
    so lazy mappings keep memory at one parameter per model. ``on_param(phase, name)`` is called after each
    parameter of each pass (``phase`` ``"count"`` then ``"merge"``), for progress."""
    method, ratio = MergeMethod(method), OverlapRatio(ratio)
    if not (math.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold}")
    labels = list(labels) if labels is not None else [f"model {j}" for j in range(len(models))]
    if not models:
        raise ValueError("merge: at least one fine-tuned model is needed")
    names = list(base.keys())
    for label, sd in zip(labels, models):
        missing, extra = sorted(set(names) - set(sd.keys())), sorted(set(sd.keys()) - set(names))
        if missing or extra:
            what = (f"lacks parameter {missing[0]!r}" if missing else f"has parameter {extra[0]!r} the base lacks")
            raise ValueError(f"{label} {what} ({len(missing)} missing, {len(extra)} extra): the models must share "
                             "the base's architecture and parameter names")

    def deltas(phase: str):
        for name in names:
            yield name, stack_deltas(name, base[name], [sd[name] for sd in models], labels)
            if on_param is not None:
                on_param(phase, name)

    stats = overlap_stats(deltas("count"), len(models), threshold)
    lambdas = [1.0] * len(models)
    if method is MergeMethod.RAM_PLUS:
        lambdas = rescale_factors([s.changed for s in stats], [s.shared for s in stats], rescale=rescale, ratio=ratio)
    merged = {}
    for name, deltas_N in deltas("merge"):
        b = base[name]
        merged[name] = (b.to(deltas_N.dtype) + merge_delta(deltas_N, method, threshold=threshold,
                                                           lambdas_N=lambdas)).to(b.dtype)
    return merged, stats, lambdas
