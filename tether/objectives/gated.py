"""Soft gates instead of a hard clip: SAPO (a sigmoid gate of the token ratio) and VESPO (a Gamma-shaped weight of
the sequence ratio). Both shrink the update of far-off-policy tokens smoothly rather than zeroing it at a bound.

With ``r_t = pi_theta(y_t) / pi_old(y_t)`` (log-ratio clamped to +-20, 0 on padding):

- SAPO (Gao et al. 2025, arXiv 2511.20347; verl ``compute_policy_loss_sapo``, TRL ``loss_type="sapo"``):
  ``f_tau(r) = sigmoid(tau (r - 1)) 4 / tau``, ``tau = tau_pos`` if ``A > 0`` else ``tau_neg``;
  ``l_t = -f_tau(r_t) A_t``. At ``r = 1`` its gradient is the policy gradient ``-A grad log pi``; it decays as
  ``r`` leaves 1 (``d l / d log pi = -A 4 s (1 - s) r`` with ``s = sigmoid(tau (r - 1))``).
- VESPO (arXiv 2602.10693; TRL ``GRPOTrainer.get_gamma_weights``, ``loss_type="vespo"``): with the sequence
  ratio ``log w_i = clamp(sum_t m log r_t, log 1e-8, 20)``, ``phi(w) = exp(lam + k log w - lam w)``
  (``phi(1) = 1``; ``k, lam = k_pos, lam_pos`` if ``A >= 0`` else ``k_neg, lam_neg``), detached;
  ``l_t = -phi(w_i) A_t log pi_theta(y_t)``, token-mean.

Every weight is per row, so micro-batching is exact (no whole-batch statistic).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tether.objectives.inputs import LossInputs, masked_mean
from tether.objectives.policy_gradient import _agg, policy_metrics
from tether.objectives.ratios import sequence_log_ratio, token_log_ratio
from tether.objectives.registry import Preset, register

VESPO_LOG_W_MIN = math.log(1e-8)
"""VESPO's lower clamp of the sequence log-ratio (TRL, matching the paper's code)."""


def _by_sign(cond_BT: Tensor, if_true: float, if_false: float, like: Tensor) -> Tensor:
    """``if_true`` where ``cond``, else ``if_false``, in ``like``'s dtype (python floats would give float32)."""
    return torch.where(cond_BT, torch.tensor(if_true, dtype=like.dtype, device=like.device),
                       torch.tensor(if_false, dtype=like.dtype, device=like.device))


def sapo_gate(ratio_BT: Tensor, advantages_BT: Tensor, *, tau_pos: float, tau_neg: float) -> Tensor:
    """``f_tau(r) = sigmoid(tau (r - 1)) 4 / tau`` with ``tau = tau_pos`` where ``A > 0``, else ``tau_neg``."""
    tau = _by_sign(advantages_BT > 0, tau_pos, tau_neg, ratio_BT)
    return torch.sigmoid(tau * (ratio_BT - 1.0)) * (4.0 / tau)


def sapo(inputs: LossInputs, *, agg: str, tau_pos: float, tau_neg: float) -> tuple[Tensor, dict[str, Tensor]]:
    """SAPO: ``l_t = -f_tau(r_t) A_t`` (module docstring). Metric ``sapo/gate_mean``: mean of ``f_tau(r)``."""
    if not (tau_pos > 0 and tau_neg > 0):
        raise ValueError(f"sapo: tau_pos and tau_neg must be > 0, got {tau_pos}, {tau_neg}")
    lr = token_log_ratio(inputs.logp_theta_BT, inputs.logp_old_BT, inputs.mask_BT)
    ratio = torch.exp(lr)
    gate = sapo_gate(ratio, inputs.advantages_BT, tau_pos=tau_pos, tau_neg=tau_neg)
    loss_BT = torch.where(inputs.mask_BT.bool(), -gate * inputs.advantages_BT, 0.0)
    metrics = {"sapo/gate_mean": masked_mean(gate.detach(), inputs.mask_BT),
               **policy_metrics(inputs, log_ratio_BT=lr, ratio_BT=ratio)}
    return _agg(inputs, loss_BT, agg), metrics


def vespo_weights(logp_theta_BT: Tensor, logp_old_BT: Tensor, advantages_BT: Tensor, mask_BT: Tensor, *,
                  k_pos: float, lambda_pos: float, k_neg: float, lambda_neg: float) -> Tensor:
    """VESPO's detached Gamma weight ``phi(w_i)`` of the sequence ratio, broadcast to ``[B, T]`` (module docstring);
    the sign of each token's advantage picks ``(k, lam)``. Non-finite values become 0 (as TRL)."""
    with torch.no_grad():
        lr = token_log_ratio(logp_theta_BT.detach(), logp_old_BT.detach(), mask_BT)
        log_w = sequence_log_ratio(lr, mask_BT).clamp(VESPO_LOG_W_MIN, 20.0)[:, None]
        nonneg = advantages_BT >= 0
        k = _by_sign(nonneg, k_pos, k_neg, lr)
        lam = _by_sign(nonneg, lambda_pos, lambda_neg, lr).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
        return torch.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0)


def vespo(inputs: LossInputs, *, agg: str, k_pos: float, lambda_pos: float, k_neg: float,
          lambda_neg: float) -> tuple[Tensor, dict[str, Tensor]]:
    """VESPO: ``l_t = -sg(phi(w_i)) A_t log pi_theta(y_t)`` (module docstring). Metric ``vespo/phi_mean``: the mean
    of ``phi`` over loss tokens."""
    phi = vespo_weights(inputs.logp_theta_BT, inputs.logp_old_BT, inputs.advantages_BT, inputs.mask_BT,
                        k_pos=k_pos, lambda_pos=lambda_pos, k_neg=k_neg, lambda_neg=lambda_neg)
    loss_BT = torch.where(inputs.mask_BT.bool(), -phi * inputs.advantages_BT * inputs.logp_theta_BT, 0.0)
    return _agg(inputs, loss_BT, agg), {"vespo/phi_mean": masked_mean(phi, inputs.mask_BT), **policy_metrics(inputs)}


register(Preset(
    name="sapo",
    description="SAPO: a soft sigmoid gate of the token ratio instead of a hard clip (tau+ 1.0, tau- 1.05).",
    fn=sapo,
    defaults={"agg": "seq-mean-token-mean", "tau_pos": 1.0, "tau_neg": 1.05},
    advantage="grpo",
    source=("Gao et al. 2025 (Soft Adaptive Policy Optimization, arXiv 2511.20347); verl core_algos.py "
            "compute_policy_loss_sapo (actor tau_pos 1.0, tau_neg 1.05, seq-mean-token-mean); TRL GRPOTrainer "
            "loss_type='sapo' (sapo_temperature_pos 1.0, sapo_temperature_neg 1.05)"),
    equation="r_t = pi_theta/pi_old; tau = tau_pos if A > 0 else tau_neg; l_t = -sigmoid(tau (r_t - 1)) (4/tau) A_t",
    tighten={},
))
register(Preset(
    name="vespo",
    description="VESPO: REINFORCE weighted by a Gamma kernel of the sequence ratio (k+ 2, lam+ 3, k- 3, lam- 2).",
    fn=vespo,
    defaults={"agg": "token-mean", "k_pos": 2.0, "lambda_pos": 3.0, "k_neg": 3.0, "lambda_neg": 2.0},
    advantage="grpo",
    source=("VESPO (Variational Sequence-Level Soft Policy Optimization, arXiv 2602.10693); TRL GRPOTrainer "
            "get_gamma_weights, loss_type='vespo' (vespo_k_pos 2, vespo_lambda_pos 3, vespo_k_neg 3, "
            "vespo_lambda_neg 2; normalised by the global token count)"),
    equation=("log w_i = clamp(sum_t m log r_t, log 1e-8, 20); phi = exp(lam + k log w - lam w), (k, lam) by "
              "sign(A); l_t = -sg(phi(w_i)) A_t log pi_theta(y_t); token-mean"),
    tighten={},
))
