"""An enumerable autoregressive policy with tabular logits per prefix, and its exact objective.

Vocabulary ``V``, fixed horizon ``T``; every prefix of length ``0..T-1`` has its own row of logits,
so the parameter is ``theta_PV`` with ``P = (V^T - 1)/(V - 1)`` rows (prefix ``(y_1..y_t)`` sits at
row ``(V^t - 1)/(V - 1) + sum_j y_j V^(t-j)``). All ``N = V^T`` sequences are enumerated once; the
per-token log-probs of all of them are one gather:

    log pi(y_t | y_<t) = theta[p_t, y_t] - logsumexp(theta[p_t])

Exact ``J(theta) = sum_y pi(y) R(y)``; exact ``grad J`` is autograd through that sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MAX_SEQUENCES = 200_000


@dataclass(frozen=True)
class Space:
    """The enumerated sequences ``seqs_NT`` and the logit row ``prefix_NT`` of every token."""

    vocab: int
    horizon: int
    seqs_NT: Tensor
    prefix_NT: Tensor

    @property
    def num_prefixes(self) -> int:
        return (self.vocab**self.horizon - 1) // (self.vocab - 1)

    @property
    def num_seqs(self) -> int:
        return self.seqs_NT.shape[0]


def make_space(vocab: int, horizon: int) -> Space:
    """Enumerate all ``V^T`` sequences (lexicographic) and their prefix rows."""
    if vocab < 2:
        raise ValueError(f"lab: vocab must be >= 2, got {vocab}")
    if horizon < 1:
        raise ValueError(f"lab: horizon must be >= 1, got {horizon}")
    if vocab**horizon > MAX_SEQUENCES:
        raise ValueError(f"lab: vocab^horizon = {vocab**horizon} exceeds {MAX_SEQUENCES} sequences")
    n = vocab**horizon
    idx = torch.arange(n)
    powers = vocab ** torch.arange(horizon - 1, -1, -1)
    seqs = (idx[:, None] // powers[None, :]) % vocab
    prefix = torch.zeros(n, horizon, dtype=torch.long)
    code = torch.zeros(n, dtype=torch.long)
    for t in range(horizon):
        offset = (vocab**t - 1) // (vocab - 1)
        prefix[:, t] = offset + code
        code = code * vocab + seqs[:, t]
    return Space(vocab=vocab, horizon=horizon, seqs_NT=seqs, prefix_NT=prefix)


def init_logits(space: Space, *, scale: float = 1.0, seed: int = 0) -> Tensor:
    """Random tabular logits ``theta_PV ~ scale * N(0, 1)`` in float64."""
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(space.num_prefixes, space.vocab, generator=g, dtype=torch.float64)


def token_logp(logits_PV: Tensor, space: Space) -> Tensor:
    """``log pi(y_t | y_<t)`` of every enumerated sequence, ``[N, T]`` (one vectorised gather)."""
    logp_PV = torch.log_softmax(logits_PV, dim=-1)
    return logp_PV[space.prefix_NT, space.seqs_NT]


def token_logp_from_probs(probs_PV: Tensor, space: Space) -> Tensor:
    """As ``token_logp`` for a per-prefix probability table (zeros give ``-inf``)."""
    return torch.log(probs_PV)[space.prefix_NT, space.seqs_NT]


def seq_probs(logp_NT: Tensor) -> Tensor:
    """``pi(y) = exp(sum_t log pi(y_t | y_<t))``, ``[N]``."""
    return torch.exp(logp_NT.sum(-1))


def expected_reward(logits_PV: Tensor, space: Space, rewards_N: Tensor) -> Tensor:
    """Exact ``J(theta) = sum_y pi_theta(y) R(y)`` (differentiable)."""
    return (seq_probs(token_logp(logits_PV, space)) * rewards_N).sum()


def exact_gradient(logits_PV: Tensor, space: Space, rewards_N: Tensor) -> Tensor:
    """Exact ``grad J`` by autograd through the enumerated sum, ``[P, V]``."""
    theta = logits_PV.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(expected_reward(theta, space, rewards_N), theta)
    return grad


def score_function_gradient(logits_PV: Tensor, space: Space, rewards_N: Tensor) -> Tensor:
    """``sum_y pi(y) R(y) grad log pi(y)``, the score-function identity (a reference for tests)."""
    theta = logits_PV.detach().requires_grad_(True)
    logp_NT = token_logp(theta, space)
    pi_N = seq_probs(logp_NT).detach()
    (grad,) = torch.autograd.grad((pi_N * rewards_N * logp_NT.sum(-1)).sum(), theta)
    return grad


def pattern_reward(space: Space, target: list[int] | Tensor) -> Tensor:
    """Fraction of positions matching a target sequence, ``R(y) = mean_t 1[y_t = target_t]``."""
    target_T = torch.as_tensor(target, dtype=torch.long)
    if target_T.shape != (space.horizon,):
        raise ValueError(f"lab: target must have {space.horizon} tokens, got {tuple(target_T.shape)}")
    return (space.seqs_NT == target_T).to(torch.float64).mean(-1)


def sum_reward(space: Space, k: int) -> Tensor:
    """Verifiable reward ``R(y) = 1[sum_t y_t = k]``."""
    return (space.seqs_NT.sum(-1) == k).to(torch.float64)


REWARDS = ("pattern", "sum")


def make_reward(space: Space, name: str, *, seed: int = 0) -> Tensor:
    """``pattern``: a random target pattern; ``sum``: sum of tokens equals ``round(T (V-1) / 2)``."""
    if name == "pattern":
        g = torch.Generator().manual_seed(seed + 1)
        return pattern_reward(space, torch.randint(space.vocab, (space.horizon,), generator=g))
    if name == "sum":
        return sum_reward(space, round(space.horizon * (space.vocab - 1) / 2))
    raise ValueError(f"lab: unknown reward '{name}'; valid: {', '.join(REWARDS)}")
