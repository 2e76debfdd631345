"""Exact expected gradient of every turn-level credit estimator on an enumerable 2-turn MDP (issue 14 item 5).

The MDP: in ``s0`` the policy picks ``stop`` (episode ends, reward ``r_stop``), ``A`` or ``B`` (reward ``c_A`` /
``c_B``, the episode goes on to state ``s_A`` / ``s_B``); there it picks one of two actions with rewards
``r_A[a]`` / ``r_B[a]`` and the episode ends. A tabular softmax policy: 3 + 2 + 2 logits. Five trajectories.

For a group of ``G`` episodes the estimator's gradient is ``g = (1/G) sum_e sum_k A_{e,k} grad log pi(a_{e,k}|s_{e,k})``
with ``A = CREDIT[name](...)`` on the group; its expectation is the sum over all ``5^G`` ordered G-tuples of
trajectories weighted by their probability, exact. The truth is ``grad J``, ``J = sum_tau pi(tau) R(tau)``, by
autograd. Reported: cosine to ``grad J``, ``scale = <E g, grad J> / |grad J|^2``, the relative error
``|E g - grad J| / |grad J|``, the direction error ``|E g - scale grad J| / |scale grad J|`` and the total
variance ``E|g|^2 - |E g|^2``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from tether.agent.credit import BASELINES, CREDIT


@dataclass
class CreditLabConfig:
    group_size: int = 3
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    estimators: list[str] = field(default_factory=lambda: list(CREDIT))
    r_stop: float = 0.5
    c_A: float = 0.3
    c_B: float = 0.0
    r_A: tuple[float, float] = (1.0, 0.0)
    r_B: tuple[float, float] = (0.9, 0.6)
    logits: tuple[float, ...] = (0.2, -0.3, 0.1, 0.0, 0.4, -0.5, 0.3)
    """s0 (stop, A, B), s_A (2), s_B (2)."""

    def validate(self) -> None:
        if self.group_size < 2 or self.group_size > 5:
            raise ValueError(f"credit lab: group_size must be in 2..5, got {self.group_size}")
        for b in self.baselines:
            if b not in BASELINES:
                raise ValueError(f"credit lab: unknown baseline '{b}'; valid: {', '.join(BASELINES)}")
        for n in self.estimators:
            if n not in CREDIT:
                raise ValueError(f"credit lab: unknown estimator '{n}'; valid: {', '.join(CREDIT)}")
        if len(self.logits) != 7:
            raise ValueError("credit lab: logits must have 7 entries (s0: 3, s_A: 2, s_B: 2)")


# each trajectory: list of (state, action) per turn; state ids 0 = s0, 1 = s_A, 2 = s_B
TRAJECTORIES = [[(0, 0)], [(0, 1), (1, 0)], [(0, 1), (1, 1)], [(0, 2), (2, 0)], [(0, 2), (2, 1)]]
_ROWS = {0: slice(0, 3), 1: slice(3, 5), 2: slice(5, 7)}


def _logp(theta, state: int, action: int):
    return torch.log_softmax(theta[_ROWS[state]], dim=0)[action]


def mdp(cfg: CreditLabConfig):
    """(theta, per-trajectory rewards [5, 2], turn mask [5, 2], state ids [5, 2], probabilities [5],
    score vectors grad log pi per turn [5, 2, 7], true grad J [7], J)."""
    theta = torch.tensor(cfg.logits, dtype=torch.float64, requires_grad=True)
    turn_reward = {(0, 0): cfg.r_stop, (0, 1): cfg.c_A, (0, 2): cfg.c_B,
                   (1, 0): cfg.r_A[0], (1, 1): cfg.r_A[1], (2, 0): cfg.r_B[0], (2, 1): cfg.r_B[1]}
    T = len(TRAJECTORIES)
    rewards = torch.zeros(T, 2, dtype=torch.float64)
    mask = torch.zeros(T, 2, dtype=torch.bool)
    states = torch.zeros(T, 2, dtype=torch.long)
    scores = torch.zeros(T, 2, 7, dtype=torch.float64)
    logps = []
    for i, traj in enumerate(TRAJECTORIES):
        total = 0
        for k, (s, a) in enumerate(traj):
            rewards[i, k], mask[i, k], states[i, k] = turn_reward[(s, a)], True, s
            lp = _logp(theta, s, a)
            scores[i, k] = torch.autograd.grad(lp, theta, retain_graph=True)[0]
            total = total + lp
        logps.append(total)
    probs = torch.exp(torch.stack(logps))
    J = (probs * rewards.sum(1)).sum()
    grad = torch.autograd.grad(J, theta)[0]
    return rewards, mask, states, probs.detach(), scores, grad, float(J.detach())


def expected_gradient(name: str, baseline: str, cfg: CreditLabConfig, parts=None) -> tuple[torch.Tensor, float]:
    """Exact (E g, E|g|^2 - |E g|^2) of the estimator over all G-tuples of trajectories."""
    rewards, mask, states, probs, scores, _, _ = parts if parts is not None else mdp(cfg)
    G, T = cfg.group_size, len(TRAJECTORIES)
    tuples = torch.tensor(list(itertools.product(range(T), repeat=G)), dtype=torch.long)  # [M, G]
    idx = tuples.reshape(-1)
    group = torch.arange(tuples.shape[0]).repeat_interleave(G)
    A = CREDIT[name](rewards[idx], mask[idx], group, states[idx], baseline=baseline).to(torch.float64)
    g = (A[:, :, None] * scores[idx]).sum(1).view(tuples.shape[0], G, -1).mean(1)  # [M, P]
    w = probs[tuples].prod(1)
    mean = (w[:, None] * g).sum(0)
    var = float((w * (g * g).sum(1)).sum() - (mean * mean).sum())
    return mean, var


def run_credit_lab(cfg: CreditLabConfig) -> dict:
    cfg.validate()
    parts = mdp(cfg)
    truth = parts[5]
    rows = []
    for name in cfg.estimators:
        for baseline in cfg.baselines:
            mean, var = expected_gradient(name, baseline, cfg, parts)
            scale = float(mean @ truth / (truth @ truth))
            cos = float(mean @ truth / (mean.norm() * truth.norm()).clamp(min=1e-300))
            rel = float((mean - truth).norm() / truth.norm())
            direction = float((mean - scale * truth).norm() / (abs(scale) * truth.norm()).clamp(min=1e-300))
            rows.append({"estimator": name, "baseline": baseline, "cosine": cos, "scale": scale,
                         "rel_error": rel, "direction_error": direction, "variance": var,
                         "default": baseline == _default_baseline(name)})
    return {"group_size": cfg.group_size, "J": parts[6], "grad_norm": float(truth.norm()), "results": rows}


def _default_baseline(name: str) -> str:
    return "mean" if name == "turn_unbiased" else "std"


def markdown_table(result: dict) -> str:
    out = (f"G = {result['group_size']}, J = {result['J']:.4f}, |grad J| = {result['grad_norm']:.4f}; "
           "* = the estimator's default baseline\n\n"
           "| estimator | baseline | cosine | scale | rel. error | direction error | variance |\n"
           "|---|---|---|---|---|---|---|\n")
    for r in result["results"]:
        star = "*" if r["default"] else ""
        out += (f"| {r['estimator']} | {r['baseline']}{star} | {r['cosine']:.6f} | {r['scale']:.4f} | "
                f"{r['rel_error']:.4f} | {r['direction_error']:.4f} | {r['variance']:.4f} |\n")
    return out
