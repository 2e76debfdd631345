"""FAKER-Air's recipe in the RL loop (methods.md (a)11; docs/tasks.md, class-wise rewards): the class-wise reward
with its PI-controlled constraint terms, the stateful ``rank_ema`` advantage, and the PI-controlled KL coefficient.

Every piece keeps its state in ``RunState.classwise`` (plain floats, saved in every checkpoint), so a resumed
run continues each average, integral and multiplier where it stopped. The maths are the pure functions of
``tether.objectives.classwise`` and ``tether.objectives.advantages``; this module owns only the state and the
order of the updates, which is FAKER-Air's (``grpo_train.py`` main loop):

* reward, once per step: the completion's number (``parse_number``, last number) and the answer's are binned
  (``bin_classes``); ``R_i = classwise_reward_i + constraint_terms_i`` with this step's multipliers; then the
  batch recall and false-alarm ratio enter their EMAs, which the multipliers follow (``pi_update``: recall
  below its floor raises ``lam_rec``, a false-alarm ratio above its target raises ``lam_far``).
* advantage ``rank_ema``: ``rank_ema`` on each call with the state's EMA (one call per step).
* KL: the step's measured KL (token-mean k3 of pi_theta_s, the step's starting policy, to the reference over
  loss tokens) enters its EMA; the
  coefficient is updated from it *before* this step's penalty uses it, as FAKER-Air does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from tether.objectives.advantages import rank_ema
from tether.objectives.classwise import (
    bin_classes,
    classwise_reward,
    constraint_terms,
    ema,
    pi_update,
    recall_far,
)
from tether.objectives.inputs import masked_mean
from tether.objectives.kl import kl_penalty_in_loss
from tether.tasks.rewards import parse_number

PI_DECAY = 0.95  # FAKER-Air's integral decay, for every controller

StateFn = Callable[[], dict[str, float]]


def _number(text: str) -> float:
    value = parse_number(text)
    return math.nan if value is None else float(value)


class ClasswiseReward:
    """The class-wise reward of a step's completions against their answers (module docstring)."""

    def __init__(self, cfg: Any, state: StateFn) -> None:
        self.c, self.bounds, self.state = cfg.classwise, cfg.class_bound_values, state

    def __call__(self, texts: Sequence[str], answers: Sequence[str]) -> tuple[Tensor, dict[str, float]]:
        c, st = self.c, self.state()
        st.setdefault("lam_rec", c.lambda_init)
        st.setdefault("lam_far", c.lambda_init)
        pred = bin_classes(torch.tensor([_number(t) for t in texts], dtype=torch.float64), self.bounds)
        gold = bin_classes(torch.tensor([_number(a) for a in answers], dtype=torch.float64), self.bounds)
        r = classwise_reward(pred, gold, high_from=c.high_from, coarse_w=c.coarse, exact_w=c.exact,
                             fa_penalty=c.fa_penalty)
        recall, far = recall_far(pred, gold, high_from=c.high_from)
        metrics = {"class/reward_mean": float(r.mean()), "class/recall": recall, "class/far": far,
                   "class/exact": float(((pred == gold) & (pred >= 0)).double().mean()),
                   "class/unread": float((pred < 0).double().mean())}
        if c.constraints:
            r = r + constraint_terms(pred, gold, high_from=c.high_from, lam_rec=st["lam_rec"], lam_far=st["lam_far"],
                                     recall_floor=c.recall_floor, far_target=c.far_target)
            st["recall_ema"] = ema(st.get("recall_ema"), recall, c.metric_alpha)
            st["far_ema"] = ema(st.get("far_ema"), far, c.metric_alpha)
            gains = dict(kp=c.kp, ki=c.ki, decay=PI_DECAY, lo=0.0, hi=c.lambda_max)
            st["lam_rec"], st["rec_i"] = pi_update(st["lam_rec"], st.get("rec_i", 0.0),
                                                   c.recall_floor - st["recall_ema"], **gains)
            st["lam_far"], st["far_i"] = pi_update(st["lam_far"], st.get("far_i", 0.0),
                                                   st["far_ema"] - c.far_target, **gains)
            metrics.update({"class/lambda_rec": st["lam_rec"], "class/lambda_far": st["lam_far"],
                            "class/recall_ema": st["recall_ema"], "class/far_ema": st["far_ema"]})
        return r.to(torch.float32), metrics


class RankEmaAdvantage:
    """``rank_ema`` bound to the run state (``adv_ema_alpha``, ``adv_ema_coeff``); an ``AdvantageFn``."""

    def __init__(self, cfg: Any, state: StateFn) -> None:
        self.alpha, self.coeff, self.state = cfg.adv_ema_alpha, cfg.adv_ema_coeff, state

    def __call__(self, rewards_B: Tensor, group_B: Tensor, include_B: Tensor | None = None) -> Tensor:
        st = self.state()
        a, st["adv_ema_mean"], st["adv_ema_var"] = rank_ema(
            rewards_B, group_B, include_B, ema_mean=st.get("adv_ema_mean", 0.0), ema_var=st.get("adv_ema_var", 1e-6),
            alpha=self.alpha, coeff=self.coeff)
        return a


def measured_kl(logp_BT: Tensor, logp_ref_BT: Tensor, mask_BT: Tensor) -> float:
    """The KL the controller reads: token-mean over loss tokens of the ``k3`` penalty (``kl_penalty_in_loss``)."""
    per_token = kl_penalty_in_loss(logp_BT.detach().to(torch.float64), logp_ref_BT.to(torch.float64), mask_BT,
                                   estimator="k3", coef=1.0)
    return float(masked_mean(per_token, mask_BT))


class KLCoefController:
    """The PI-controlled KL coefficient (``kl_target``): ``coef(kl)`` updates and returns this step's value."""

    def __init__(self, kl: Any, state: StateFn) -> None:
        self.kl, self.state = kl, state

    def coef(self, kl_value: float) -> tuple[float, dict[str, float]]:
        k, st = self.kl, self.state()
        st["kl_ema"] = ema(st.get("kl_ema"), kl_value, k.ema_alpha)
        st["kl_coef"], st["kl_i"] = pi_update(st.get("kl_coef", k.coef), st.get("kl_i", 0.0), st["kl_ema"] - k.target,
                                              kp=k.kp, ki=k.ki, decay=PI_DECAY, lo=k.coef_min, hi=k.coef_max)
        return st["kl_coef"], {"kl/coef": st["kl_coef"], "kl/measured": kl_value, "kl/measured_ema": st["kl_ema"]}
