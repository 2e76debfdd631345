"""One call per step: every mismatch ratio that exists in a batch, its statistics, the decomposition.

Ratios (``meter/{name}/...``; each is computed only when its inputs are given):

    engine     log pi_old(v)/mu            with logp_behave_old_BT (pi_old at the behaviour version v)
               log pi_old/mu on fresh tokens   without it: tokens whose version == current_version
                                               (all tokens when no versions are given)
    staleness  log pi_old(current)/pi_old(v)   needs logp_old_BT and logp_behave_old_BT
    drift      log pi_theta/pi_old             needs logp_theta_BT and logp_old_BT
    total      log pi_theta/mu                 or log pi_old/mu when logp_theta_BT is not given

Without behaviour-version log-probs, ``pi_old/mu`` on a stale token mixes engine and staleness, so
the engine ratio keeps only fresh tokens (no host sync: the mask is a tensor op) and the total keeps
them all. ``meter/decomp/...`` holds the split of the total (``decompose.py``); when it is unavailable
the dict holds the string ``meter/decomp/unavailable`` instead. Every other value is a detached 0-dim
float64 tensor; ``to_floats`` converts the dict once per step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from tether.meter.decompose import decompose
from tether.meter.stats import DEFAULT_THRESHOLDS, F64, profile_stats, ratio_stats

RATIO_NAMES = ("engine", "staleness", "drift", "total")
CORRECTION_KEY_PARTS = ("clipfrac", "mask", "frac")
"""An objective metric whose key contains one of these is passed through under ``meter/correction/``."""


def _ratios(
    logp_theta_BT: Tensor | None,
    logp_old_BT: Tensor | None,
    logp_mu_BT: Tensor | None,
    logp_behave_old_BT: Tensor | None,
    mask_BT: Tensor,
    version_BT: Tensor | None,
    current_version: int | None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """``name -> (log_ratio_BT, mask_BT)`` for every ratio the inputs allow."""
    m = mask_BT.detach().bool()
    out: dict[str, tuple[Tensor, Tensor]] = {}
    if logp_mu_BT is not None and logp_behave_old_BT is not None:
        out["engine"] = (logp_behave_old_BT - logp_mu_BT, m)
    elif logp_mu_BT is not None and logp_old_BT is not None:
        fresh = m
        if version_BT is not None and current_version is not None:
            fresh = m & (version_BT.detach().to(m.device) == current_version)
        out["engine"] = (logp_old_BT - logp_mu_BT, fresh)
    if logp_old_BT is not None and logp_behave_old_BT is not None:
        out["staleness"] = (logp_old_BT - logp_behave_old_BT, m)
    if logp_theta_BT is not None and logp_old_BT is not None:
        out["drift"] = (logp_theta_BT - logp_old_BT, m)
    if logp_mu_BT is not None and logp_theta_BT is not None:
        out["total"] = (logp_theta_BT - logp_mu_BT, m)
    elif logp_mu_BT is not None and logp_old_BT is not None:
        out["total"] = (logp_old_BT - logp_mu_BT, m)
    return out


def correction_metrics(objective_metrics: Mapping[str, Any] | None) -> dict[str, Tensor]:
    """Fractions clipped / truncated / masked, by reason, from an objective's metrics dict.

    Every key containing ``clipfrac``, ``mask`` or ``frac`` is passed through as
    ``meter/correction/{key}`` (e.g. ``pg/clipfrac`` -> ``meter/correction/pg/clipfrac``).
    """
    out: dict[str, Tensor] = {}
    for key, value in (objective_metrics or {}).items():
        if any(part in key for part in CORRECTION_KEY_PARTS):
            v = value.detach() if isinstance(value, Tensor) else torch.as_tensor(value)
            out[f"meter/correction/{key}"] = v.to(F64).reshape(())
    return out


def version_metrics(version_BT: Tensor, mask_BT: Tensor, current_version: int) -> dict[str, Tensor]:
    """``meter/version/{stale_frac, age_mean, age_max}``: age = current_version - v over valid tokens (0 if none)."""
    m = mask_BT.detach().bool()
    age = torch.where(m, (current_version - version_BT.detach().to(m.device)).to(F64), torch.zeros((), dtype=F64))
    n = m.sum().to(F64)
    nn = n.clamp(min=1.0)
    return {
        "meter/version/stale_frac": ((age > 0) & m).sum().to(F64) / nn,
        "meter/version/age_mean": age.sum() / nn,
        "meter/version/age_max": age.max() if age.numel() else torch.zeros((), dtype=F64),
    }


def measure(
    *,
    mask_BT: Tensor,
    logp_theta_BT: Tensor | None = None,
    logp_old_BT: Tensor | None = None,
    logp_mu_BT: Tensor | None = None,
    logp_behave_old_BT: Tensor | None = None,
    entropy_BT: Tensor | None = None,
    version_BT: Tensor | None = None,
    current_version: int | None = None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    objective_metrics: Mapping[str, Any] | None = None,
    profiles: bool | Sequence[str] = True,
) -> dict[str, Tensor | str]:
    """Every meter metric of one batch (module docstring; definitions in docs/metrics.md).

    All log-prob tensors are ``[B, T]`` and aligned with ``mask_BT``. ``entropy_BT`` (nats, of the
    policy that gives the probability profile) enables the entropy profile. The probability profile
    buckets tokens by ``exp(logp_mu_BT)`` (the sampler's probability), or by ``exp(logp_old_BT)``
    when mu is not given. ``profiles``: True for every ratio, False for none, or the ratio names
    to profile (e.g. ``("total",)``): each profiled ratio adds about 115 per-bucket keys.
    """
    shape = mask_BT.shape
    if mask_BT.dim() != 2:
        raise ValueError(f"measure: mask_BT must be [B, T], got shape {tuple(shape)}")
    given = {
        "logp_theta_BT": logp_theta_BT,
        "logp_old_BT": logp_old_BT,
        "logp_mu_BT": logp_mu_BT,
        "logp_behave_old_BT": logp_behave_old_BT,
        "entropy_BT": entropy_BT,
        "version_BT": version_BT,
    }
    for name, t in given.items():
        if t is not None and t.shape != shape:
            raise ValueError(f"measure: {name} has shape {tuple(t.shape)}, expected {tuple(shape)} (the shape of mask_BT)")
    if version_BT is not None and current_version is None:
        raise ValueError("measure: version_BT was given without current_version")

    if isinstance(profiles, bool):
        profiled = set(RATIO_NAMES) if profiles else set()
    else:
        profiled = set(profiles)
        unknown = sorted(profiled - set(RATIO_NAMES))
        if unknown:
            raise ValueError(f"measure: profiles names unknown ratio {unknown[0]!r}; valid: {', '.join(RATIO_NAMES)}")

    out: dict[str, Tensor | str] = {}
    prob_logp = logp_mu_BT if logp_mu_BT is not None else logp_old_BT
    for name, (z_BT, m_BT) in _ratios(
        logp_theta_BT, logp_old_BT, logp_mu_BT, logp_behave_old_BT, mask_BT, version_BT, current_version
    ).items():
        out.update(ratio_stats(z_BT, m_BT, prefix=f"meter/{name}", thresholds=thresholds))
        if name in profiled:
            out.update(profile_stats(z_BT, m_BT, prefix=f"meter/{name}", logp_BT=prob_logp, entropy_BT=entropy_BT))
    if version_BT is not None and current_version is not None:
        out.update(version_metrics(version_BT, mask_BT, current_version))
    dec = decompose(
        logp_old_BT=logp_old_BT,
        logp_mu_BT=logp_mu_BT,
        logp_behave_old_BT=logp_behave_old_BT,
        mask_BT=mask_BT,
        version_BT=version_BT,
        current_version=current_version,
    )
    out.update(dec.metrics)
    if dec.unavailable is not None:
        out["meter/decomp/unavailable"] = dec.unavailable
    out.update(correction_metrics(objective_metrics))
    return out


def to_floats(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Tensors to Python floats (one host transfer for all of them); strings pass through."""
    out: dict[str, Any] = {k: v for k, v in metrics.items() if not isinstance(v, Tensor)}
    by_device: dict[torch.device, list[str]] = {}
    for k, v in metrics.items():
        if isinstance(v, Tensor):
            by_device.setdefault(v.device, []).append(k)
    for keys in by_device.values():
        values = torch.stack([metrics[k].detach().reshape(()) for k in keys]).to(F64).cpu().tolist()
        out.update(zip(keys, values))
    return out
