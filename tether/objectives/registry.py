"""The preset registry: named compositions of the pure objective functions.

A preset is a loss function ``fn(inputs: LossInputs, **hparams) -> (loss, metrics)`` plus its
default hyper-parameters, the advantage estimator it is meant to be used with, its loss
aggregation, and its source. Presets are resolved once at start-up (``get_preset``); an unknown
name or an unknown hyper-parameter is an error that lists the valid ones.

Preset modules register themselves on import; ``load_all`` imports every module of
``tether.objectives`` once so that the registry is complete.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import Tensor

from tether.objectives.inputs import LossInputs

LossFn = Callable[..., tuple[Tensor, dict[str, Tensor]]]

TIGHTEN_RULES = ("upper", "lower", "scale")
"""How a correction hyper-parameter moves towards "no update spread" when the mismatch control tightens it by
``s`` in (0, 1]: ``upper`` (a ratio bound or cap >= 1: ``h' = 1 + (min(h, 10) - 1) s``), ``lower`` (a ratio
bound <= 1: ``l' = 1 - (1 - l) s``), ``scale`` (a clip range: ``eps' = eps s``)."""
DEFAULT_TIGHTEN = {"cap": "upper", "high": "upper", "low": "lower", "eps_low": "scale", "eps_high": "scale"}
"""The rule of each hyper-parameter name the presets share (a preset can declare its own ``tighten``)."""
TIGHTEN_CAP_FOR_INF = 10.0
"""An infinite cap is first replaced by this (the auto rule's largest cap) so it can be tightened."""


def tighten_args(args: Mapping[str, Any], scale: float, rules: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The hyper-parameters ``args`` tightened by ``scale`` in (0, 1] under ``rules`` (name -> rule of
    ``TIGHTEN_RULES``; default ``DEFAULT_TIGHTEN``), pure. Names absent or ``None`` are left alone; ``scale = 1``
    returns the arguments unchanged."""
    if not 0 < scale <= 1:
        raise ValueError(f"tighten_args: scale must be in (0, 1], got {scale}")
    out = dict(args)
    if scale == 1:
        return out
    for key, rule in (DEFAULT_TIGHTEN if rules is None else rules).items():
        v = out.get(key)
        if v is None:
            continue
        if rule == "upper":
            out[key] = 1.0 + (min(float(v), TIGHTEN_CAP_FOR_INF) - 1.0) * scale
        elif rule == "lower":
            out[key] = 1.0 - (1.0 - float(v)) * scale
        elif rule == "scale":
            out[key] = float(v) * scale
        else:
            raise ValueError(f"tighten_args: unknown rule {rule!r} for {key!r}; valid: {', '.join(TIGHTEN_RULES)}")
    return out


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    """One line: what it is."""
    fn: LossFn
    defaults: Mapping[str, Any] = field(default_factory=dict)
    """Hyper-parameters with their defaults (from methods.md); includes ``agg``."""
    advantage: str = "grpo"
    """Name of the advantage estimator in ``tether.objectives.advantages.ADVANTAGES``."""
    source: str = ""
    """Paper / code the defaults come from."""
    requires: tuple[str, ...] = ()
    """Optional ``LossInputs`` fields that must be present (e.g. ``logp_mu_BT``)."""
    equation: str = ""
    """The per-token loss in plain text, for docs and ``tether objectives --verbose``."""
    batch_stats: Callable[[LossInputs, Mapping[str, Any]], dict[str, Any]] | None = None
    """Whole-batch statistics the loss reads (P3O's ESS): ``batch_stats(inputs, args) -> overrides``, called by
    the trainer once per optimiser step on the whole step's inputs, its result passed as hyper-parameters to
    every micro-batch, so the loss and gradient do not depend on how the step is split. ``None``: the loss has
    no whole-batch statistic beyond the global normalisers ``num_tokens`` / ``num_seqs``."""

    tighten: Mapping[str, str] | None = None
    """How the mismatch control may tighten this preset's correction hyper-parameters: name -> rule of
    ``TIGHTEN_RULES``. ``None``: the ``DEFAULT_TIGHTEN`` names among its defaults."""

    check: Callable[[Mapping[str, Any]], None] | None = None
    """Checks the resolved hyper-parameters' values (``ValueError`` naming the bad one), at ``resolve`` time, so a
    run refuses a bad combination at start-up rather than at the first loss. ``None``: the loss checks its own."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))
        rules = self.tighten if self.tighten is not None else {
            k: r for k, r in DEFAULT_TIGHTEN.items() if k in self.defaults}
        bad = sorted(k for k, r in rules.items() if k not in self.defaults or r not in TIGHTEN_RULES)
        if bad:
            raise ValueError(f"preset '{self.name}': tighten names {', '.join(bad)}, which are not hyper-parameters "
                             f"with a rule in {', '.join(TIGHTEN_RULES)}")
        object.__setattr__(self, "tighten", MappingProxyType(dict(rules)))

    def resolve(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        params = dict(self.defaults)
        for key, value in (overrides or {}).items():
            if key not in params:
                valid = ", ".join(sorted(params)) or "(none)"
                raise ValueError(f"objective '{self.name}' has no hyper-parameter '{key}'; valid: {valid}")
            params[key] = value
        if self.check is not None:
            try:
                self.check(params)
            except ValueError as e:
                raise ValueError(f"objective '{self.name}': {e}") from None
        return params

    def __call__(self, inputs: LossInputs, **overrides: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """The checked entry point: required inputs present, overrides known, then the loss."""
        inputs.require(*self.requires, preset=self.name)
        return self.fn(inputs, **self.resolve(overrides))

    def step_overrides(self, inputs: LossInputs, args: Mapping[str, Any]) -> dict[str, Any]:
        """``args`` plus this preset's whole-batch statistics of ``inputs`` (the whole optimiser step)."""
        if self.batch_stats is None:
            return dict(args)
        return {**args, **self.batch_stats(inputs, args)}


_PRESETS: dict[str, Preset] = {}
_LOADED = False


def register(preset: Preset) -> Preset:
    if preset.name in _PRESETS:
        raise ValueError(f"objective preset '{preset.name}' registered twice")
    _PRESETS[preset.name] = preset
    return preset


def load_all() -> None:
    """Import every module of ``tether.objectives`` so each preset registers itself."""
    global _LOADED
    if _LOADED:
        return
    import tether.objectives as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{info.name}")
    _LOADED = True


def presets() -> dict[str, Preset]:
    load_all()
    return dict(_PRESETS)


def get_preset(name: str) -> Preset:
    load_all()
    try:
        return _PRESETS[name]
    except KeyError:
        valid = ", ".join(sorted(_PRESETS))
        raise ValueError(f"unknown objective '{name}'; valid objectives: {valid}") from None
