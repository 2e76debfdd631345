"""ALP's objective: the importance ratio of the perturbed training policy against the rollout policy.

Adaptive Layerwise Perturbation (arXiv 2603.19470, methods.md §(a)4; Chenluye99/Adaptive-Layerwise-Perturbation)
adds learnable Gaussian noise to every decoder layer's input during the training forward only
(``tether.models.perturb``; ``tether train --alp``), so ``logp_theta_BT`` is ``log pi_{theta, delta}``, and uses

    rho^ALP = pi_{theta, delta}(y | x) / mu(y | x)

as the *only* ratio, in bypass mode: the rollout policy's log-probs ``logp_mu_BT`` stand where ``logp_old_BT``
would (no separate staleness and engine factors). ``logp_old_BT`` is not read. Without ``--alp`` (no noise) these
presets are the paper's "Bypass" baselines: PPO on ``pi_theta / mu``.

Two variants, both PPO-style dual-clipped surrogates:

- token (Token-ALP, ``alp``): ``r_t = exp(delta_t)``, ``delta_t = clamp(log pi_{theta,delta}(y_t) - log mu(y_t),
  -20, 20)`` on loss tokens; ``l_t = max(-A r_t, -A clip(r_t, 1 - eps_low, 1 + eps_high))``, where ``A < 0``:
  ``min(l_t, -A c)``. Defaults of the single-turn script: eps 0.2 / 0.2, c 10.
- sequence (Seq-ALP, ``alp_seq``, the paper's best): the product ratio ``s_i = exp(clamp(sum_t m_t delta_t,
  -20, 20))`` (``ppo_is_geometric=False``: a product, not a geometric mean; INFERRED from the flag name), the
  same clipped surrogate on ``s_i`` with the multi-turn script's constants (verl convention: eps_low 0.5,
  eps_high 3.0, so ``s`` is clipped to ``[0.5, 4]``; c 3). The gradient path is the stop-gradient token form
  ``log s~_{i,t} = sg(log s_i) + log pi(y_t) - sg(log pi(y_t))`` (clamped at +10): every token of row ``i``
  carries the value ``l_i`` and the gradient ``dl_i/dlog s_i * grad log pi(y_t)``, so with ``seq-mean-token-sum``
  the gradient is exactly that of ``mean_i l_i`` and with the default ``seq-mean-token-mean`` the loss value is
  ``mean_i l_i`` and each row's gradient is divided by its length (GSPO's convention). The paper's aggregation was
  not retrieved (methods.md, open item 4): INFERRED.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tether.objectives.aggregation import aggregate
from tether.objectives.inputs import LossInputs, float_mask, masked_mean
from tether.objectives.policy_gradient import _ppo_clip
from tether.objectives.ratios import (
    LOG_RATIO_CLAMP,
    sequence_log_ratio,
    straight_through_log_ratio,
    token_log_ratio,
)
from tether.objectives.registry import Preset, register


def alp_token_log_ratio(logp_theta_BT: Tensor, logp_mu_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Token-ALP's log-ratio ``delta_t = m_t clamp(log pi_{theta,delta}(y_t) - log mu(y_t), -20, 20)``; its
    gradient is ``grad log pi_{theta,delta}(y_t)`` inside the clamp."""
    return token_log_ratio(logp_theta_BT, logp_mu_BT.detach(), mask_BT)


def alp_sequence_log_ratio(logp_theta_BT: Tensor, logp_mu_BT: Tensor, mask_BT: Tensor) -> tuple[Tensor, Tensor]:
    """Seq-ALP's ``(log s~_BT, log s_B)``: ``log s_i = clamp(sum_t m_t delta_t, -20, 20)`` (detached value) and its
    stop-gradient token form ``log s~_{i,t} = m_t (sg(log s_i) + log pi(y_t) - sg(log pi(y_t)))``, clamped at
    +10, whose gradient on token ``t`` is ``grad log pi_{theta,delta}(y_t)``."""
    delta_BT = token_log_ratio(logp_theta_BT.detach(), logp_mu_BT.detach(), mask_BT)
    log_s_B = sequence_log_ratio(delta_BT, mask_BT).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    value_BT = log_s_B[:, None].expand_as(logp_theta_BT)
    st_BT = straight_through_log_ratio(value_BT, logp_theta_BT)
    return torch.where(mask_BT.bool(), st_BT, 0.0), log_s_B


def _agg(inputs: LossInputs, loss_BT: Tensor, agg: str) -> Tensor:
    return aggregate(
        loss_BT, inputs.mask_BT, agg, num_tokens=inputs.num_tokens, num_seqs=inputs.num_seqs, horizon=inputs.horizon
    )


def _ratio_metrics(log_ratio: Tensor, valid: Tensor, prefix: str) -> dict[str, Tensor]:
    """``{prefix}ratio_mean``, ``{prefix}ratio_max`` and ``{prefix}abs_log_ratio_max`` over ``valid`` entries."""
    with torch.no_grad():
        m = float_mask(valid, log_ratio.dtype)
        if not bool(valid.any()):
            zero = log_ratio.new_zeros(())
            return {f"{prefix}ratio_mean": zero, f"{prefix}ratio_max": zero, f"{prefix}abs_log_ratio_max": zero}
        lr = log_ratio.detach()
        return {
            f"{prefix}ratio_mean": masked_mean(lr.exp(), valid),
            f"{prefix}ratio_max": lr[valid].max().exp(),
            f"{prefix}abs_log_ratio_max": (lr.abs() * m).max(),
        }


def alp_token(inputs: LossInputs, *, agg: str, eps_low: float, eps_high: float,
              dual_clip_c: float | None) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-ALP: dual-clip PPO on ``r_t = pi_{theta,delta}(y_t) / mu(y_t)`` (module docstring)."""
    delta_BT = alp_token_log_ratio(inputs.logp_theta_BT, inputs.logp_mu_BT, inputs.mask_BT)
    loss_BT, _, metrics = _ppo_clip(delta_BT, inputs.advantages_BT, inputs.mask_BT, eps_low=eps_low,
                                    eps_high=eps_high, dual_clip_c=dual_clip_c)
    metrics.update(_ratio_metrics(delta_BT, inputs.mask_BT.bool(), "alp/token_"))
    return _agg(inputs, loss_BT, agg), metrics


def alp_sequence(inputs: LossInputs, *, agg: str, eps_low: float, eps_high: float,
                 dual_clip_c: float | None) -> tuple[Tensor, dict[str, Tensor]]:
    """Seq-ALP: dual-clip PPO on the product ratio ``s_i = prod_t pi_{theta,delta}(y_t) / mu(y_t)`` in
    stop-gradient token form (module docstring)."""
    st_BT, log_s_B = alp_sequence_log_ratio(inputs.logp_theta_BT, inputs.logp_mu_BT, inputs.mask_BT)
    loss_BT, _, metrics = _ppo_clip(st_BT, inputs.advantages_BT, inputs.mask_BT, eps_low=eps_low,
                                    eps_high=eps_high, dual_clip_c=dual_clip_c)
    metrics.update(_ratio_metrics(log_s_B, inputs.mask_BT.bool().any(-1), "alp/seq_"))
    return _agg(inputs, loss_BT, agg), metrics


_SOURCE = ("ALP, arXiv 2603.19470; Chenluye99/Adaptive-Layerwise-Perturbation (train_perturb.sh); the noise is "
           "tether train --alp")
_DUAL = "; A<0: min(., -A c)"
for _name, _fn, _what, _defaults, _equation in (
    ("alp", alp_token, "Token-ALP: dual-clip PPO on pi_theta/mu (bypass: mu is the only anchor)",
     {"agg": "token-mean", "eps_low": 0.2, "eps_high": 0.2, "dual_clip_c": 10.0}, (
         "r_t = pi_{theta,delta}(y_t)/mu(y_t); l_t = max(-A r_t, -A clip(r_t, 1-eps_low, 1+eps_high))" + _DUAL)),
    ("alp_seq", alp_sequence, "Seq-ALP: dual-clip PPO on the product sequence ratio pi_theta/mu (bypass)",
     {"agg": "seq-mean-token-mean", "eps_low": 0.5, "eps_high": 3.0, "dual_clip_c": 3.0}, (
         "s_i = exp(sum_t log pi_{theta,delta}(y_t) - log mu(y_t)); l_i = max(-A s_i, -A clip(s_i, 1-eps_low, "
         "1+eps_high))" + _DUAL + "; every token carries l_i (stop-gradient token form)")),
):
    _clip = (f"eps {_defaults['eps_low']:g}/{_defaults['eps_high']:g}" if _name == "alp"
             else f"s clipped to [{1 - _defaults['eps_low']:g}, {1 + _defaults['eps_high']:g}]")
    register(Preset(
        name=_name, description=f"{_what}, pi_theta perturbed per layer with --alp; {_clip}, c {_defaults['dual_clip_c']:g}.",
        fn=_fn, defaults=_defaults, advantage="grpo", source=_SOURCE, requires=("logp_mu_BT",), equation=_equation,
    ))
