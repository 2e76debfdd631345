"""Environments by name (stop-gap: ``module:Factory`` only; the built-in environments land next)."""

from __future__ import annotations

from tether.tasks.rewards import _import_module


def make_env_factory(spec: str):
    module_name, _, attr = spec.rpartition(":")
    if not module_name:
        raise ValueError(f"environment {spec!r}: not a built-in; use module:Factory or file.py:Factory")
    obj = _import_module(module_name, spec)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj
