"""KL(pi_theta || pi_ref) estimators, their placement (reward or loss) and a bias check.

With ``z = log pi_theta(y_t) - log pi_ref(y_t)`` at sampled tokens (methods.md §0):

- ``k1 = z``                      (unbiased value, zero-mean gradient when differentiated)
- ``k2 = z^2 / 2``                (biased value, gradient ``z grad log pi``)
- ``k3 = exp(-z) - 1 + z``        (unbiased low-variance value; exponent clamped to [-10, 10] as FeynRL)
- ``k3plus``                      (value of k3, gradient of k2: straight-through, verl "k3+")

Clamps act on values only: ``z`` is clamped to [-20, 20] and k3's exponent to [-10, 10] with
``clamp_straight_through``, whose gradient is 1 everywhere, so a token far from the reference is still
pulled back. The estimators see the clamped value: past |z| = 20, k2's and k3plus's gradient is
``+-20 grad log pi`` (not ``z grad log pi``), and past |z| = 10 k3's exponential term is ``e^10``.

Which combinations give the gradient of KL(pi_theta||pi_ref)? With y ~ pi_theta the true gradient is
``E[z grad log pi]`` (the term ``E[grad log pi]`` vanishes).

- In the loss (the estimator's value is differentiated, samples held fixed), the gradient is
  ``E[k'(z) grad log pi]``: k1 gives ``E[grad log pi] = 0`` (the penalty does nothing in
  expectation); k2 and k3plus give ``E[z grad log pi]`` (correct); k3 gives
  ``E[(1 - pi_ref/pi) grad log pi] = grad KL(pi_ref || pi_theta)``, the *forward* KL's gradient.
- In the reward (the estimator is a detached reward in a score-function gradient), the gradient is
  ``E[k(z) grad log pi]``: k1 is correct; k2, k3, k3plus are biased.

``check_kl_combination`` warns once for each biased combination; tests verify every claim by exact
enumeration on a categorical distribution (tests/unit/test_kl.py).

Off-policy samples (y ~ mu): ``importance_corrected_kl`` = ``(pi_theta/mu) * k3`` with the ratio
*not* detached (DeepSeek-V3.2's unbiased KL; slime ``--use-unbiased-kl``). Its value is unbiased for
KL under mu and its gradient is ``E_pi[(k3 + 1 - exp(-z)) grad log pi] = E_pi[z grad log pi]``. It is the
loss-placement estimator ``k3_is`` (``kl_penalty_in_loss(..., estimator="k3_is", logp_mu_BT=...)``); it has no
reward form (its ratio carries the gradient).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from tether.objectives.ratios import LOG_RATIO_CLAMP

EXP_CLAMP = 10.0


def k1(z: Tensor) -> Tensor:
    return z


def k2(z: Tensor) -> Tensor:
    return 0.5 * z * z


def k3(z: Tensor) -> Tensor:
    return torch.exp(clamp_straight_through(-z, EXP_CLAMP)) - 1.0 + z


def k3plus(z: Tensor) -> Tensor:
    """Value of k3, gradient of k2: ``k2 - sg(k2) + sg(k3)``."""
    v2 = k2(z)
    return v2 - v2.detach() + k3(z).detach()


ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {"k1": k1, "k2": k2, "k3": k3, "k3plus": k3plus}
IMPORTANCE_CORRECTED = "k3_is"
"""The loss estimator ``(pi_theta/mu) k3`` (``importance_corrected_kl``): needs ``logp_mu``, loss placement only."""
ESTIMATOR_NAMES = (*ESTIMATORS, IMPORTANCE_CORRECTED)
UNBIASED_IN = {"loss": {"k2", "k3plus", IMPORTANCE_CORRECTED}, "reward": {"k1"}}
_WARNED: set[tuple[str, str]] = set()


def kl_estimator(name: str) -> Callable[[Tensor], Tensor]:
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown KL estimator '{name}'; valid: {', '.join(ESTIMATORS)}") from None


def check_kl_combination(estimator: str, placement: str) -> bool:
    """Warn (once per combination) when the estimator in this placement does not give the gradient of
    KL(pi_theta||pi_ref) in expectation. Returns True when the combination is unbiased. ``k3_is`` in the reward
    is an error (its importance ratio must carry the gradient)."""
    if estimator != IMPORTANCE_CORRECTED:
        kl_estimator(estimator)
    if placement not in UNBIASED_IN:
        raise ValueError(f"unknown KL placement '{placement}'; valid: {', '.join(UNBIASED_IN)}")
    if estimator == IMPORTANCE_CORRECTED and placement != "loss":
        raise ValueError(f"KL estimator {IMPORTANCE_CORRECTED} is a loss estimator (its ratio pi_theta/mu carries the "
                         "gradient); use it with KL placement loss")
    ok = estimator in UNBIASED_IN[placement]
    if not ok and (estimator, placement) not in _WARNED:
        _WARNED.add((estimator, placement))
        good = ", ".join(sorted(UNBIASED_IN[placement]))
        warnings.warn(
            f"KL estimator {estimator} in the {placement} does not give the gradient of KL(pi_theta||pi_ref) "
            f"in expectation (see tether.objectives.kl); unbiased choices in the {placement}: {good}",
            stacklevel=2,
        )
    return ok


class _ClampStraightThrough(torch.autograd.Function):
    """Forward ``clamp(x, -bound, bound)``, backward the identity."""

    @staticmethod
    def forward(ctx, x: Tensor, bound: float) -> Tensor:  # type: ignore[override]
        return x.clamp(-bound, bound)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


def clamp_straight_through(x: Tensor, bound: float) -> Tensor:
    """``clamp(x, -bound, bound)`` in value, gradient 1 everywhere ("clamp the value, let the gradient
    through"): a plain clamp has gradient 0 outside the bound, which would switch the penalty off for
    exactly the tokens furthest from the reference."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _ClampStraightThrough.apply(x, bound)
    return x.clamp(-bound, bound)


def _z(logp_BT: Tensor, logp_ref_BT: Tensor, mask_BT: Tensor) -> Tensor:
    z = clamp_straight_through(logp_BT - logp_ref_BT, LOG_RATIO_CLAMP)
    return torch.where(mask_BT.bool(), z, torch.zeros_like(z))


def kl_penalty_in_loss(logp_theta_BT: Tensor, logp_ref_BT: Tensor, mask_BT: Tensor, *, estimator: str = "k3plus",
                       coef: float = 1.0, logp_mu_BT: Tensor | None = None) -> Tensor:
    """Per-token loss ``coef * k(z)`` (0 off the mask); aggregate it like the policy loss. ``estimator="k3_is"``:
    ``coef * importance_corrected_kl`` with the behaviour log-probs ``logp_mu_BT`` (required)."""
    if estimator == IMPORTANCE_CORRECTED:
        if logp_mu_BT is None:
            raise ValueError(f"KL estimator {IMPORTANCE_CORRECTED} needs the behaviour log-probs logp_mu_BT")
        return coef * importance_corrected_kl(logp_theta_BT, logp_ref_BT, logp_mu_BT, mask_BT)
    k = kl_estimator(estimator)(_z(logp_theta_BT, logp_ref_BT.detach(), mask_BT))
    return torch.where(mask_BT.bool(), coef * k, torch.zeros_like(k))


def kl_penalty_in_reward(logp_BT: Tensor, logp_ref_BT: Tensor, mask_BT: Tensor, *, coef: float,
                         estimator: str = "k1") -> Tensor:
    """Per-token reward adjustment ``-coef * k(z)``, detached (sum over tokens for an outcome reward)."""
    k = kl_estimator(estimator)(_z(logp_BT.detach(), logp_ref_BT.detach(), mask_BT))
    return torch.where(mask_BT.bool(), -coef * k, torch.zeros_like(k)).detach()


def importance_corrected_kl(logp_theta_BT: Tensor, logp_ref_BT: Tensor, logp_mu_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Per-token ``(pi_theta/mu) * k3(z)`` with the ratio differentiated (unbiased value and gradient
    of KL(pi_theta||pi_ref) from samples of mu)."""
    z = _z(logp_theta_BT, logp_ref_BT.detach(), mask_BT)
    log_w = (logp_theta_BT - logp_mu_BT.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    out = torch.exp(log_w) * k3(z)
    return torch.where(mask_BT.bool(), out, torch.zeros_like(out))
