"""The lab run: objectives x mismatch strengths -> bias / variance / cosine, plus multi-step runs."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tether.lab.estimators import (
    RAW_ESTIMATORS,
    exact_moments,
    is_separable,
    monte_carlo_moments,
    preset_coefficients,
    preset_inputs,
    raw_coefficients,
    skip_reason,
)
from tether.lab.mismatch import MISMATCHES, behaviour_probs
from tether.lab.policy import (
    exact_gradient,
    expected_reward,
    init_logits,
    make_reward,
    make_space,
    seq_probs,
    token_logp,
    token_logp_from_probs,
)
from tether.objectives import get_preset, presets
from tether.train.progress import QUIET, Reporter

DEFAULT_OBJECTIVES = ("grpo", "tis", "ctpo", "gspo", "p3o", "sequence_is", "cumulative_is", "token_is")


def parse_objective(spec: str) -> tuple[str, dict[str, Any]]:
    """An objective spec ``NAME`` or ``NAME:key=value:key=value`` -> ``(NAME, overrides)``: a preset with some
    hyper-parameters overridden (each value read as a JSON literal, ``2``, ``true``, ``null``, else as a string),
    so one lab run can compare a preset with its variants (``mis``, ``mis:length_calibration=sqrt:ref_len=4``)."""
    name, *pairs = spec.split(":")
    args: dict[str, Any] = {}
    for pair in pairs:
        key, eq, text = pair.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"lab: objective '{spec}': '{pair}' is not key=value (NAME:key=value:key=value)")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        args[key.strip()] = value
    return name.strip(), args


def default_objectives() -> list[str]:
    """The default set, less presets not registered in this build (names given explicitly are strict)."""
    known = presets()
    return [n for n in DEFAULT_OBJECTIVES if n in known or n in RAW_ESTIMATORS]


@dataclass
class LabConfig:
    mismatch: str = "precision"
    strengths: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.3, 1.0])
    objectives: list[str] = field(default_factory=lambda: default_objectives())
    vocab: int = 4
    horizon: int = 6
    reward: str = "pattern"
    logit_scale: float = 1.0
    old: str = "mu"
    seed: int = 0
    mc_batch: int = 16
    mc_batches: int = 4096
    steps: int = 0
    lr: float = 0.1
    optimizer: str = "adam"

    def validate(self) -> None:
        if self.mismatch not in MISMATCHES:
            raise ValueError(f"lab: unknown mismatch '{self.mismatch}'; valid: {', '.join(MISMATCHES)}")
        valid = sorted(set(presets()) | set(RAW_ESTIMATORS))
        for spec in self.objectives:
            name, args = parse_objective(spec)
            if name not in valid:
                raise ValueError(f"lab: unknown objective '{name}'; valid: {', '.join(valid)}")
            if args and name in RAW_ESTIMATORS:
                raise ValueError(f"lab: objective '{spec}': the raw estimator '{name}' has no hyper-parameters")
            if args:
                get_preset(name).resolve(args)  # unknown names and bad values fail before any compute
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"lab: optimizer must be 'adam' or 'sgd', got '{self.optimizer}'")
        if self.old not in ("pi", "mu"):
            raise ValueError(f"lab: old must be 'pi' or 'mu', got '{self.old}'")


def measure(cfg: LabConfig, progress: Reporter | None = None) -> dict:
    """Bias / variance / MSE / cosine of every objective at every strength (exact where separable); ``progress``
    shows one step per (strength, objective)."""
    cfg.validate()
    space = make_space(cfg.vocab, cfg.horizon)
    theta = init_logits(space, scale=cfg.logit_scale, seed=cfg.seed)
    rewards = make_reward(space, cfg.reward, seed=cfg.seed)
    grad_J = exact_gradient(theta, space, rewards)
    logp_pi = token_logp(theta, space)
    J = float((seq_probs(logp_pi) * rewards).sum())
    adv = rewards - J
    rows = []
    with (progress or QUIET).phase("lab: exact moments", len(cfg.strengths) * len(cfg.objectives)) as bar:
        for s in cfg.strengths:
            logp_mu = token_logp_from_probs(behaviour_probs(theta, cfg.mismatch, s, seed=cfg.seed), space)
            mu_N = seq_probs(logp_mu)
            for spec in cfg.objectives:
                name, args = parse_objective(spec)
                row = {"objective": spec, "strength": s}
                reason = None if name in RAW_ESTIMATORS else skip_reason(name)
                if reason:
                    rows.append({**row, "skipped": reason})
                    bar.advance()
                    continue
                if name in RAW_ESTIMATORS:
                    m = exact_moments(theta, space, raw_coefficients(name, logp_pi, logp_mu, adv), mu_N, grad_J)
                elif not is_separable(name, logp_pi, logp_mu, adv, old=cfg.old, seed=cfg.seed, args=args):
                    m = monte_carlo_moments(
                        name, theta, space, logp_pi, logp_mu, adv, grad_J,
                        batch=cfg.mc_batch, num_batches=cfg.mc_batches, old=cfg.old, seed=cfg.seed, args=args,
                    )
                else:
                    c = preset_coefficients(name, logp_pi, logp_mu, adv, old=cfg.old, args=args)
                    m = exact_moments(theta, space, c, mu_N, grad_J)
                rows.append({**row, **m.as_dict()})
                bar.advance()
    return {"config": cfg.__dict__, "J": J, "grad_norm": float(grad_J.norm()), "results": rows}


def train_steps(cfg: LabConfig, spec: str, strength: float) -> dict:
    """``cfg.steps`` optimiser steps of objective ``name`` from the same start: each step draws a batch
    of ``cfg.mc_batch`` sequences from ``mu`` (the mismatch model applied to the current ``theta``),
    ``A = R - J(theta)`` (exact baseline), ``theta_old = theta``. Diverged: ``J`` not finite, or
    ``J`` below half its start."""
    name, args = parse_objective(spec)
    space = make_space(cfg.vocab, cfg.horizon)
    theta = init_logits(space, scale=cfg.logit_scale, seed=cfg.seed).requires_grad_(True)
    rewards = make_reward(space, cfg.reward, seed=cfg.seed)
    opt = (torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.SGD)([theta], lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed + 7)
    with torch.no_grad():
        J0 = float(expected_reward(theta, space, rewards))
    Js = [J0]
    for step in range(cfg.steps):
        with torch.no_grad():
            logp_all = token_logp(theta, space)
            J = float((seq_probs(logp_all) * rewards).sum())
            mu_PV = behaviour_probs(theta, cfg.mismatch, strength, seed=cfg.seed + step)
            logp_mu_all = token_logp_from_probs(mu_PV, space)
            mu_N = seq_probs(logp_mu_all)
        idx = torch.multinomial(mu_N / mu_N.sum(), cfg.mc_batch, replacement=True, generator=g)
        logp_theta = token_logp(theta, space)[idx]
        adv = rewards[idx] - J
        if name in RAW_ESTIMATORS:
            c = raw_coefficients(name, logp_theta.detach(), logp_mu_all[idx], adv).nan_to_num(0.0, 0.0, 0.0)
            loss = -(c * logp_theta).sum() / cfg.mc_batch
        else:
            loss, _ = get_preset(name)(preset_inputs(logp_theta, logp_all[idx], logp_mu_all[idx], adv, old=cfg.old),
                                       **args)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            Js.append(float(expected_reward(theta, space, rewards)))
    diverged = any(not math.isfinite(j) for j in Js) or min(Js) < 0.5 * J0
    return {"objective": spec, "strength": strength, "J": Js, "diverged": diverged}


def run_lab(cfg: LabConfig, out: Path | None = None, progress: Reporter | None = None) -> dict:
    t0 = time.perf_counter()
    result = measure(cfg, progress)
    if cfg.steps > 0:
        runs = [(s, spec) for s in cfg.strengths for spec in cfg.objectives
                if (name := parse_objective(spec)[0]) in RAW_ESTIMATORS or skip_reason(name) is None]
        result["steps"] = []
        with (progress or QUIET).phase(f"lab: {cfg.steps} training steps", len(runs)) as bar:
            for s, spec in runs:
                result["steps"].append(train_steps(cfg, spec, s))
                bar.advance()
    result["seconds"] = time.perf_counter() - t0
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=2))
        plot(result, out / "bias.png")
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(dict.fromkeys(r["objective"] for r in result["results"]))
    for name in names:
        rs = [r for r in result["results"] if r["objective"] == name and "bias" in r]
        if rs:
            ax.plot([r["strength"] for r in rs], [r["bias"] for r in rs], marker="o", label=name)
    cfg = result["config"]
    ax.set_xlabel(f"{cfg['mismatch']} strength")
    ax.set_ylabel("relative bias ||E g - grad J|| / ||grad J||")
    ax.set_title(f"V={cfg['vocab']} T={cfg['horizon']} reward={cfg['reward']} old={cfg['old']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
