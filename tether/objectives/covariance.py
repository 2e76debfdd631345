"""Clip-Cov and KL-Cov (Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning Language
Models", arXiv 2505.22617; verl ``compute_policy_loss_clip_cov`` / ``compute_policy_loss_kl_cov``, adapted from
PRIME-RL/Entropy-Mechanism-of-RL). Entropy collapses through the tokens whose log-probability and advantage
co-vary most; these objectives act on those few tokens only.

Per loss token, with means over every loss token of the optimiser step (detached):
``cov_t = (A_t - mean A) (log pi_theta(y_t) - mean log pi_theta)``, and ``n = max(floor(ratio N), 1)`` with ``N``
the step's loss-token count.

- ``clip_cov``: PPO clip ``l_t = max(-A r, -A clip(r, 1-eps_low, 1+eps_high))``; among the tokens the clip leaves
  alone (``-A clip(r) <= -A r``) with ``lb < cov_t < ub``, the ``n`` with the largest covariance get ``l_t = 0``
  (their gradient is cut). verl picks the ``n`` uniformly at random among those candidates; tether takes the ``n``
  largest (deterministic, and the same whatever the micro-batch split).
- ``kl_cov``: ``l_t = -A r_t`` (no clip) plus ``kl_coef |log r_t|`` on the ``n`` tokens of largest covariance.

The means and the covariance threshold are whole-step statistics (``Preset.batch_stats``); a micro-batch receives
them as hyper-parameters, so its loss is the exact share of the whole step's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from tether.objectives.inputs import LossInputs, masked_mean, masked_means
from tether.objectives.policy_gradient import _agg, policy_metrics
from tether.objectives.ratios import token_log_ratio
from tether.objectives.registry import Preset, register

STAT_NAMES = ("mean_adv", "mean_logp", "cov_threshold")


def token_covariance(logp_theta_BT: Tensor, advantages_BT: Tensor, mask_BT: Tensor, *, mean_adv: Tensor | float,
                     mean_logp: Tensor | float) -> Tensor:
    """``cov_t = (A_t - mean_adv) (sg(log pi_theta_t) - mean_logp)`` (detached; 0 off the mask)."""
    cov = (advantages_BT.detach() - mean_adv) * (logp_theta_BT.detach() - mean_logp)
    return torch.where(mask_BT.bool(), cov, torch.zeros_like(cov))


def _ppo_terms(inputs: LossInputs, eps_low: float, eps_high: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(log r, -A r, -A clip(r, 1 - eps_low, 1 + eps_high))``."""
    lr = token_log_ratio(inputs.logp_theta_BT, inputs.logp_old_BT, inputs.mask_BT)
    ratio = torch.exp(lr)
    adv = inputs.advantages_BT
    return lr, -adv * ratio, -adv * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)


def _candidates(inputs: LossInputs, cov_BT: Tensor, args: Mapping[str, Any]) -> Tensor:
    """The tokens that may be selected: every loss token (kl_cov), or those the clip leaves alone with
    ``lb < cov < ub`` (clip_cov, ``args`` has ``lb``)."""
    valid = inputs.mask_BT.bool()
    if "lb" not in args:
        return valid
    _, l1, l2 = _ppo_terms(inputs, args["eps_low"], args["eps_high"])
    return valid & ~(l2.detach() > l1.detach()) & (cov_BT > args["lb"]) & (cov_BT < args["ub"])


def covariance_stats(inputs: LossInputs, args: Mapping[str, Any]) -> dict[str, Any]:
    """The whole-step statistics of ``inputs``: ``mean_adv``, ``mean_logp`` over loss tokens and ``cov_threshold``,
    the ``n``-th largest covariance among the candidates (``inf`` when there is none: nothing is selected)."""
    mask = inputs.mask_BT
    mean_adv = masked_mean(inputs.advantages_BT.detach(), mask)
    mean_logp = masked_mean(inputs.logp_theta_BT.detach(), mask)
    cov = token_covariance(inputs.logp_theta_BT, inputs.advantages_BT, mask, mean_adv=mean_adv, mean_logp=mean_logp)
    values = cov[_candidates(inputs, cov, args)]
    n = max(int(args["ratio"] * int(mask.bool().sum())), 1)
    if values.numel() == 0:
        threshold = torch.tensor(float("inf"), dtype=cov.dtype)
    else:
        threshold = torch.topk(values, min(n, values.numel())).values[-1]
    return {"mean_adv": mean_adv, "mean_logp": mean_logp, "cov_threshold": threshold}


def _selected(inputs: LossInputs, args: Mapping[str, Any]) -> Tensor:
    """The selected tokens: candidates with ``cov >= cov_threshold`` (statistics of ``inputs`` when not given)."""
    if any(args.get(k) is None for k in STAT_NAMES):
        args = {**args, **covariance_stats(inputs, args)}
    cov = token_covariance(inputs.logp_theta_BT, inputs.advantages_BT, inputs.mask_BT, mean_adv=args["mean_adv"],
                           mean_logp=args["mean_logp"])
    return _candidates(inputs, cov, args) & (cov >= args["cov_threshold"])


def _batch_stats(inputs: LossInputs, args: Mapping[str, Any]) -> dict[str, Any]:
    if all(args.get(k) is not None for k in STAT_NAMES):
        return {}
    return covariance_stats(inputs, args)


def clip_cov(inputs: LossInputs, *, agg: str, eps_low: float, eps_high: float, ratio: float, lb: float, ub: float,
             mean_adv: Any = None, mean_logp: Any = None,
             cov_threshold: Any = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Clip-Cov (module docstring): ``l_t = (1 - sel_t) max(-A r, -A clip(r))``. Metric ``clip_cov/selected_frac``."""
    if not ratio > 0:
        raise ValueError(f"clip_cov: ratio must be > 0, got {ratio}")
    args = {"eps_low": eps_low, "eps_high": eps_high, "ratio": ratio, "lb": lb, "ub": ub, "mean_adv": mean_adv,
            "mean_logp": mean_logp, "cov_threshold": cov_threshold}
    sel = _selected(inputs, args)
    lr, l1, l2 = _ppo_terms(inputs, eps_low, eps_high)
    loss_BT = torch.where(inputs.mask_BT.bool() & ~sel, torch.maximum(l1, l2), 0.0)
    metrics = masked_means({"clip_cov/selected_frac": sel, "pg/clipfrac": (l2 > l1).detach()}, inputs.mask_BT,
                           dtype=lr.dtype)
    return _agg(inputs, loss_BT, agg), {**metrics, **policy_metrics(inputs, log_ratio_BT=lr)}


def kl_cov(inputs: LossInputs, *, agg: str, ratio: float, kl_coef: float, mean_adv: Any = None,
           mean_logp: Any = None, cov_threshold: Any = None) -> tuple[Tensor, dict[str, Tensor]]:
    """KL-Cov (module docstring): ``l_t = -A r_t + sel_t kl_coef |log r_t|``. Metric ``kl_cov/selected_frac``."""
    if not ratio > 0:
        raise ValueError(f"kl_cov: ratio must be > 0, got {ratio}")
    args = {"ratio": ratio, "mean_adv": mean_adv, "mean_logp": mean_logp, "cov_threshold": cov_threshold}
    sel = _selected(inputs, args)
    lr = token_log_ratio(inputs.logp_theta_BT, inputs.logp_old_BT, inputs.mask_BT)
    loss_BT = -inputs.advantages_BT * torch.exp(lr) + torch.where(sel, kl_coef * lr.abs(), 0.0)
    loss_BT = torch.where(inputs.mask_BT.bool(), loss_BT, 0.0)
    metrics = masked_means({"kl_cov/selected_frac": sel}, inputs.mask_BT, dtype=lr.dtype)
    metrics["kl_cov/abs_log_ratio_mean"] = masked_mean(lr.detach().abs(), inputs.mask_BT)
    return _agg(inputs, loss_BT, agg), {**metrics, **policy_metrics(inputs, log_ratio_BT=lr)}


_STATS_DEFAULTS = {"mean_adv": None, "mean_logp": None, "cov_threshold": None}
_SOURCE = ("Cui et al. 2025 (The Entropy Mechanism of RL for Reasoning LMs, arXiv 2505.22617); verl core_algos.py "
           "compute_policy_loss_{name} and actor.yaml policy_loss ({defaults}); PRIME-RL/Entropy-Mechanism-of-RL")

register(Preset(
    name="clip_cov",
    description="Clip-Cov: PPO clip, plus the gradient cut on the 0.02 % of tokens with the largest "
                "log-prob x advantage covariance in (1, 5).",
    fn=clip_cov,
    defaults={"agg": "token-mean", "eps_low": 0.2, "eps_high": 0.2, "ratio": 2e-4, "lb": 1.0, "ub": 5.0,
              **_STATS_DEFAULTS},
    advantage="grpo",
    source=_SOURCE.format(name="clip_cov", defaults="clip_cov_ratio 2e-4, clip_cov_lb 1, clip_cov_ub 5, clip_ratio "
                                                    "0.2"),
    equation=("cov_t = (A_t - mean A)(log pi_t - mean log pi); sel = the max(floor(ratio N), 1) largest cov_t among "
              "unclipped tokens with lb < cov_t < ub; l_t = (1 - sel_t) max(-A r_t, -A clip(r_t, 1-eps_low, "
              "1+eps_high))"),
    batch_stats=_batch_stats,
))
register(Preset(
    name="kl_cov",
    description="KL-Cov: policy gradient -A r plus 0.1 |log r| on the 0.02 % of tokens with the largest "
                "log-prob x advantage covariance.",
    fn=kl_cov,
    defaults={"agg": "token-mean", "ratio": 2e-4, "kl_coef": 0.1, **_STATS_DEFAULTS},
    advantage="grpo",
    source=_SOURCE.format(name="kl_cov", defaults="kl_cov_ratio 2e-4, ppo_kl_coef 0.1"),
    equation=("cov_t = (A_t - mean A)(log pi_t - mean log pi); sel = the max(floor(ratio N), 1) largest cov_t; "
              "l_t = -A_t r_t + sel_t kl_coef |log r_t|"),
    batch_stats=_batch_stats,
    tighten={},
))
