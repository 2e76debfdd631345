"""StepPO: step-aligned policy optimisation (methods.md §6 (d)3, arXiv 2604.18401) [INFERRED from the abstract].

An agent *step* is one turn: the tokens of one sampled action (reasoning and tool call). StepPO replaces the
token as the unit of the PPO surrogate by the step: one ratio, one advantage and one clipped term per step.
With ``k(t)`` the step of loss token ``t`` (``LossInputs.step_BT``: the rollout's ``turn_BT``), ``S_ik`` the
loss tokens of step ``k`` of row ``i``, ``n_ik = |S_ik|`` and ``delta_t = clamp(log pi_theta - log pi_old)``::

    log r_ik = sum_{t in S_ik} delta_t                 (ratio "product", the default: r_ik = prod_t pi_theta / pi_old)
    log r_ik = (1 / n_ik) sum_{t in S_ik} delta_t      (ratio "geomean":  length-normalised, GSPO per step)
    A_ik     = (1 / n_ik) sum_{t in S_ik} A_t          (the per-token advantage is constant on a step when it
                                                        comes from tether.agent's credit; this is then its value)
    l_ik     = max(-A_ik r_ik, -A_ik clip(r_ik, 1 - eps_low, 1 + eps_high))

``log r_ik`` is clamped to ``[-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP]`` before the exponential (no gradient
beyond). The gradient is the true gradient of ``r_ik`` (no straight-through form): the clipped branch has
none. Each step's term is spread over its tokens (tokens share the step weight) and reduced by the shared
aggregation (``aggregation.aggregate``), so micro-batching keeps the loss of the whole batch:

    step_weight "one":    every token of step k carries l_ik / n_ik  (the step counts once, whatever its length)
    step_weight "tokens": every token of step k carries l_ik         (a step counts by its length)

The default (``ratio "product"``, ``step_weight "one"``, ``agg "seq-mean-token-sum"``) is the spec's loss
``-sum_k min(r_k A_k, clip(r_k) A_k)`` per episode, averaged over episodes; on-policy (``theta = theta_old``) its
gradient is exactly ``sum_k A_k sum_{t in S_k} grad log pi(y_t)``, the policy gradient (``tether lab``'s exact
check, tests/unit/test_lab.py). ``geomean`` scales a step's gradient by ``1 / n_k``. A row without ``step_BT`` (single-turn) is one step; with
``ratio "geomean"``, ``step_weight "tokens"`` and ``agg "seq-mean-token-mean"`` StepPO is then exactly GSPO's
loss and gradient with these clip ranges (tests/unit/test_steppo.py).
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import Tensor

from tether.objectives.aggregation import aggregate, parse_choice
from tether.objectives.inputs import LossInputs, masked_means
from tether.objectives.ratios import LOG_RATIO_CLAMP, token_log_ratio
from tether.objectives.registry import Preset, register

StepRatio = Enum("StepRatio", {"PRODUCT": "product", "GEOMEAN": "geomean"}, type=str)
"""How the step ratio combines its tokens' ratios: their product, or its geometric mean."""
StepWeight = Enum("StepWeight", {"ONE": "one", "TOKENS": "tokens"}, type=str)
"""How much of the step's term each of its tokens carries: ``l_k / n_k`` or ``l_k``."""


def step_index(mask_BT: Tensor, step_BT: Tensor | None) -> tuple[Tensor, int]:
    """``(k_BT, K)``: the step of every loss token (0 elsewhere) and the number of step slots per row.
    ``step_BT`` None: every row is one step. A loss token with a negative step is an error."""
    mask = mask_BT.bool()
    if step_BT is None:
        return torch.zeros(mask.shape, dtype=torch.long, device=mask.device), 1
    if step_BT.shape != mask.shape:
        raise ValueError(f"steppo: step_BT has shape {tuple(step_BT.shape)}, expected {tuple(mask.shape)}")
    k = torch.where(mask, step_BT.to(torch.long), 0)
    if bool((k < 0).any()):
        raise ValueError("steppo: a loss token has a negative step index (step_BT must be >= 0 on loss tokens)")
    return k, int(k.max()) + 1 if k.numel() else 1


def steppo_loss(logp_theta_BT: Tensor, logp_old_BT: Tensor, advantages_BT: Tensor, mask_BT: Tensor,
                step_BT: Tensor | None, *, ratio: str = "product", eps_low: float = 0.2, eps_high: float = 0.2,
                step_weight: str = "one", agg: str = "seq-mean-token-sum", num_tokens: float | Tensor | None = None,
                num_seqs: float | Tensor | None = None, horizon: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """StepPO's clipped step surrogate (module docstring); returns ``(loss, metrics)``.

    Metrics (``steppo/``, over the steps of the batch): ``clipfrac`` (steps whose clipped branch is taken with
    a different value), ``ratio_mean``, ``abs_log_ratio_mean``, ``steps`` (steps in the batch)."""
    mode = parse_choice(StepRatio, ratio, "steppo hyper-parameter 'ratio'")
    weight = parse_choice(StepWeight, step_weight, "steppo hyper-parameter 'step_weight'")
    mask = mask_BT.bool()
    k_BT, K = step_index(mask, step_BT)
    delta_BT = token_log_ratio(logp_theta_BT, logp_old_BT, mask, clamp=LOG_RATIO_CLAMP)
    dt = delta_BT.dtype
    m = mask.to(dt)
    B = logp_theta_BT.shape[0]
    n_BK = torch.zeros(B, K, dtype=dt, device=m.device).scatter_add_(1, k_BT, m)
    sum_BK = torch.zeros(B, K, dtype=dt, device=m.device).scatter_add(1, k_BT, delta_BT * m)
    adv_BK = torch.zeros(B, K, dtype=dt, device=m.device).scatter_add_(1, k_BT, advantages_BT.to(dt).detach() * m)
    valid_BK = n_BK > 0
    n_safe = n_BK.clamp(min=1.0)
    adv_BK = adv_BK / n_safe
    log_r_BK = sum_BK / n_safe if mode is StepRatio.GEOMEAN else sum_BK
    r_BK = torch.exp(log_r_BK.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    unclipped = -adv_BK * r_BK
    clipped = -adv_BK * r_BK.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss_BK = torch.where(valid_BK, torch.maximum(unclipped, clipped), 0.0)
    per_token_BK = loss_BK / n_safe if weight is StepWeight.ONE else loss_BK
    loss_BT = per_token_BK.gather(1, k_BT)
    loss = aggregate(loss_BT, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs, horizon=horizon)
    with torch.no_grad():
        steps = valid_BK.sum().to(dt)
        ones_BK = valid_BK.to(dt)
        metrics = {
            "steppo/clipfrac": ((clipped > unclipped).to(dt) * ones_BK).sum() / steps.clamp(min=1.0),
            "steppo/ratio_mean": (r_BK.detach() * ones_BK).sum() / steps.clamp(min=1.0),
            "steppo/abs_log_ratio_mean": (log_r_BK.detach().abs() * ones_BK).sum() / steps.clamp(min=1.0),
            "steppo/steps": steps,
        }
        metrics.update(masked_means({"steppo/token_abs_log_ratio_mean": delta_BT.detach().abs()}, mask, dtype=dt))
    return loss, metrics


def steppo(inputs: LossInputs, *, ratio: str, eps_low: float, eps_high: float, step_weight: str,
           agg: str) -> tuple[Tensor, dict[str, Tensor]]:
    """The ``steppo`` preset: :func:`steppo_loss` on the inputs' ``step_BT`` (None: one step per row)."""
    return steppo_loss(inputs.logp_theta_BT, inputs.logp_old_BT, inputs.advantages_BT, inputs.mask_BT,
                       inputs.step_BT, ratio=ratio, eps_low=eps_low, eps_high=eps_high, step_weight=step_weight,
                       agg=agg, num_tokens=inputs.num_tokens, num_seqs=inputs.num_seqs, horizon=inputs.horizon)


def _check(args) -> None:
    parse_choice(StepRatio, args["ratio"], "ratio")
    parse_choice(StepWeight, args["step_weight"], "step_weight")
    if not (0 <= float(args["eps_low"]) < 1):
        raise ValueError(f"hyper-parameter 'eps_low' must be in [0, 1), got {args['eps_low']}")
    if not float(args["eps_high"]) >= 0:
        raise ValueError(f"hyper-parameter 'eps_high' must be >= 0, got {args['eps_high']}")


register(Preset(
    name="steppo",
    description="StepPO: one ratio, advantage and PPO clip per agent step (turn), not per token [INFERRED].",
    fn=steppo,
    defaults={"ratio": "product", "eps_low": 0.2, "eps_high": 0.2, "step_weight": "one",
              "agg": "seq-mean-token-sum"},
    advantage="grpo",
    source="arXiv 2604.18401 (StepPO; abstract only, methods.md §6 (d)3: the reading is INFERRED; clip 0.2 is "
           "PPO's default, no paper value)",
    equation=("log r_k = sum (product, default) or mean (geomean) of the step's token log-ratios; A_k = mean of its "
              "advantages; l_k = max(-A_k r_k, -A_k clip(r_k, 1-eps_low, 1+eps_high)); each token of step k "
              "carries l_k / n_k (step_weight one) or l_k; default seq-mean-token-sum = sum_k l_k per episode"),
    check=_check,
))
