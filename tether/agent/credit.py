"""Turn-level credit assignment for multi-turn episodes: per-turn rewards -> per-turn advantages.

Every estimator is ``fn(rewards_EK, turn_mask_EK, group_E, state_EK=None, *, gamma=1.0, omega=1.0,
eps=1e-6, baseline=None) -> advantages_EK`` (registry :data:`CREDIT`):

* ``rewards_EK``: reward of turn ``k`` of episode ``e`` (0 on padded turns); the return is ``R_e = sum_k r_{e,k}``.
* ``turn_mask_EK``: the turns that happened, a prefix ``0..n_e-1`` of each row (``n_e >= 1``).
* ``group_E``: GRPO group id (episodes from one initial state); ``state_EK``: anchor-state id (GiGPO only).
* the result is 0 on padded turns; the trainer puts ``A[e, k]`` on every policy token of turn ``k``.

Notation: ``G_{e,k} = sum_{k' >= k} gamma^(k'-k) r_{e,k'}`` (return-to-go; ``G_{e,0} = R_e`` when gamma = 1).
Every estimator centres a value against the other members of a *cell* (a set of (episode, turn) entries):

``baseline``   ``A = x - b`` with
``"std"``      ``b = mean_cell x`` and the result divided by ``std_cell x + eps`` (std unbiased, n-1): GRPO
``"mean"``     ``b = mean_cell x`` (Dr. GRPO)
``"loo"``      ``b`` = mean of the cell's entries from *other episodes* (RLOO, leave-one-episode-out)

with tether's GRPO convention (``tether.objectives.advantages``): a cell with one entry has mean 0 and std 1
(``"std"``/``"mean"``: ``A = x``), and under ``"loo"`` an entry with no other episode in its cell gets 0.
``baseline=None`` is the estimator's own default (below).

Bias (docs/agents-credit.md; exact numbers from ``tether lab --credit``). ``grad J = E[sum_k grad log pi(a_k|s_k)
(G_k - b_k)]`` holds for any ``b_k`` that does not depend on the episode's own action ``a_k`` or what follows
it. A leave-one-episode-out baseline computed from other, independent episodes of the group satisfies this; a
self-inclusive mean over a cell of fixed size ``n`` scales that turn's gradient by ``(n-1)/n``; a std that
includes the episode's own value, and cells whose size or membership depends on the policy's stopping
decisions, bias the direction.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

CreditFn = Callable[..., Tensor]
BASELINES = ("std", "mean", "loo")


def _check(rewards_EK: Tensor, turn_mask_EK: Tensor, group_E: Tensor, state_EK: Tensor | None,
           baseline: str) -> None:
    if rewards_EK.dim() != 2 or turn_mask_EK.shape != rewards_EK.shape:
        raise ValueError(f"credit: rewards_EK {tuple(rewards_EK.shape)} and turn_mask_EK "
                         f"{tuple(turn_mask_EK.shape)} must be equal 2-D shapes")
    if group_E.shape != rewards_EK.shape[:1]:
        raise ValueError(f"credit: group_E has shape {tuple(group_E.shape)}, expected ({rewards_EK.shape[0]},)")
    if state_EK is not None and state_EK.shape != rewards_EK.shape:
        raise ValueError(f"credit: state_EK has shape {tuple(state_EK.shape)}, expected {tuple(rewards_EK.shape)}")
    if baseline not in BASELINES:
        raise ValueError(f"credit: unknown baseline '{baseline}'; valid: {', '.join(BASELINES)}")
    mask = turn_mask_EK.to(torch.bool)
    n = mask.sum(dim=1)
    if rewards_EK.shape[0] and (n.min() < 1 or not torch.equal(mask, _prefix(n, mask.shape[1]))):
        raise ValueError("credit: turn_mask_EK must be a non-empty prefix of every row")


def _prefix(n_E: Tensor, K: int) -> Tensor:
    return torch.arange(K, device=n_E.device)[None, :] < n_E[:, None]


def returns_to_go(rewards_EK: Tensor, turn_mask_EK: Tensor, gamma: float = 1.0) -> Tensor:
    """``G_{e,k} = sum_{k' >= k} gamma^(k'-k) r_{e,k'}`` on valid turns, 0 on padded ones (float64)."""
    r = rewards_EK.to(torch.float64) * turn_mask_EK.to(torch.float64)
    out = torch.zeros_like(r)
    running = torch.zeros(r.shape[0], dtype=torch.float64, device=r.device)
    for k in range(r.shape[1] - 1, -1, -1):
        running = r[:, k] + gamma * running
        out[:, k] = running
    return out * turn_mask_EK.to(torch.float64)


def _ids(*cols: Tensor) -> Tensor:
    """Dense ids of the distinct rows of the stacked integer columns."""
    return torch.unique(torch.stack([c.to(torch.long) for c in cols], dim=1), dim=0, return_inverse=True)[1]


def relative(x_N: Tensor, cell_N: Tensor, episode_N: Tensor, baseline: str, eps: float, *,
             lone: str = "raw", scale_N: Tensor | None = None) -> Tensor:
    """Centre each entry ``x_i`` against its cell (module docstring), float64.

    ``cell_N`` / ``episode_N``: integer cell and episode of each entry. ``lone``: what a cell with a single
    episode gives under ``"std"``/``"mean"``: ``"raw"`` (GRPO convention: mean 0, std 1) or ``"zero"`` (GiGPO's
    step groups). ``scale_N``: divide by this (+ eps) instead of the cell std under ``"std"``."""
    from tether.objectives.advantages import group_mean_std

    x = x_N.to(torch.float64)
    cell = _ids(cell_N)
    if x.numel() == 0:
        return x
    mean, std, n = group_mean_std(x, cell)
    pair = _ids(cell, episode_N)
    if baseline == "loo":
        cells = int(cell.max()) + 1
        total = torch.zeros(cells, dtype=torch.float64, device=x.device).index_add_(0, cell, x)
        count = torch.zeros_like(total).index_add_(0, cell, torch.ones_like(x))
        own = torch.zeros(int(pair.max()) + 1, dtype=torch.float64, device=x.device).index_add_(0, pair, x)
        own_n = torch.zeros_like(own).index_add_(0, pair, torch.ones_like(x))
        others = count[cell] - own_n[pair]
        b = (total[cell] - own[pair]) / others.clamp(min=1)
        return torch.where(others > 0, x - b, torch.zeros_like(x))
    if lone == "zero":
        lone_cell = n <= 1
        out = x - mean
        if baseline == "std":
            out = out / (std + eps)
        return torch.where(lone_cell, torch.zeros_like(x), out)
    single = n <= 1
    mean = torch.where(single, torch.zeros_like(mean), mean)
    if baseline == "mean":
        return x - mean
    sd = torch.where(single, torch.ones_like(std), std) if scale_N is None else scale_N.to(torch.float64)
    return (x - mean) / (sd + eps)


def _valid(turn_mask_EK: Tensor) -> tuple[Tensor, Tensor]:
    """(episode index, turn index) of every valid turn."""
    e, k = torch.nonzero(turn_mask_EK.to(torch.bool), as_tuple=True)
    return e, k


def _scatter(values_N: Tensor, e_N: Tensor, k_N: Tensor, like: Tensor) -> Tensor:
    out = torch.zeros(like.shape, dtype=torch.float64, device=like.device)
    out[e_N, k_N] = values_N
    return out.to(like.dtype if like.is_floating_point() else torch.float32)


def _episode_adv(rewards_EK: Tensor, turn_mask_EK: Tensor, group_E: Tensor, baseline: str, eps: float) -> Tensor:
    R = (rewards_EK.to(torch.float64) * turn_mask_EK.to(torch.float64)).sum(dim=1)
    ep = torch.arange(R.shape[0], device=R.device)
    return relative(R, group_E, ep, baseline, eps)


def episode(rewards_EK: Tensor, turn_mask_EK: Tensor, group_E: Tensor, state_EK: Tensor | None = None, *,
            gamma: float = 1.0, omega: float = 1.0, eps: float = 1e-6, baseline: str | None = None) -> Tensor:
    """Episode GRPO broadcast (Shao et al. 2024 on episode returns): ``A_{e,k} = (R_e - mean_g R) / (std_g R + eps)``
    on every valid turn (default ``"std"``; equals ``tether.objectives.advantages.grpo`` / ``dr_grpo`` / ``rloo``
    of the returns). Unbiased up to the factor ``(|g|-1)/|g|`` with ``"mean"``, exactly with ``"loo"``."""
    baseline = baseline or "std"
    _check(rewards_EK, turn_mask_EK, group_E, state_EK, baseline)
    A_E = _episode_adv(rewards_EK, turn_mask_EK, group_E, baseline, eps)
    out = A_E[:, None] * turn_mask_EK.to(torch.float64)
    return out.to(rewards_EK.dtype if rewards_EK.is_floating_point() else torch.float32)


def turn(rewards_EK: Tensor, turn_mask_EK: Tensor, group_E: Tensor, state_EK: Tensor | None = None, *,
         gamma: float = 1.0, omega: float = 1.0, eps: float = 1e-6, baseline: str | None = None) -> Tensor:
    """Per-turn-index GRPO: ``A_{e,k} = (G_{e,k} - mean_{(g,k)} G) / (std_{(g,k)} G + eps)``, the cell ``(g, k)`` being
    the group's episodes that *have* a turn ``k`` (the return-to-go form of MT-GRPO, Zeng et al. 2025
    arXiv 2505.11821, as agent frameworks port it; verl#7244). Default ``"std"``.

    Biased when the policy decides episode length: the cell's size and membership at ``k > 0`` are set by the
    group's stopping decisions, so even without std the self-weight ``1/n_{g,k}`` (``"mean"``) or the
    lone-cell rule (``"loo"``: no other episode reached turn k -> 0) re-weights turn ``k``'s gradient by a
    factor that depends on how likely the others were to continue."""
    baseline = baseline or "std"
    _check(rewards_EK, turn_mask_EK, group_E, state_EK, baseline)
    G = returns_to_go(rewards_EK, turn_mask_EK, gamma)
    e, k = _valid(turn_mask_EK)
    A = relative(G[e, k], _ids(group_E[e], k), e, baseline, eps)
    return _scatter(A, e, k, rewards_EK)


def turn_unbiased(rewards_EK: Tensor, turn_mask_EK: Tensor, group_E: Tensor, state_EK: Tensor | None = None, *,
                  gamma: float = 1.0, omega: float = 1.0, eps: float = 1e-6, baseline: str | None = None) -> Tensor:
    """Per-turn-index baseline over *all* the group's episodes (the correction verl#7244 asks for: a turn-level
    baseline whose terms do not depend on who stopped). An episode that ended before turn ``k`` stays in the
    cell with return-to-go 0 (an absorbing, zero-reward continuation), so every cell ``(g, k)`` has exactly
    ``|g|`` entries::

        A_{e,k} = G_{e,k} - b_{g,k},   b_{g,k} = (1/|g|) sum_{e' in g} G~_{e',k},   G~_{e',k} = 0 for k >= n_{e'}

    (default ``"mean"``; no per-index std). ``"loo"`` uses the ``|g|-1`` other episodes: ``b`` is then a function
    of independent episodes only, so ``E[grad log pi(a_{e,k}|s_{e,k}) b] = 0`` and the expected gradient is exactly
    ``grad J``; ``"mean"`` adds the self-term ``G_{e,k}/|g|`` with a *fixed* weight, so it is exactly
    ``(|g|-1)/|g| grad J``. ``"std"`` divides by the group's episode-return std (one scale per group, not per
    index): the GRPO scale, with GRPO's std bias. Singleton groups: ``A = G`` (``"std"``/``"mean"``), 0 (``"loo"``)."""
    baseline = baseline or "mean"
    _check(rewards_EK, turn_mask_EK, group_E, state_EK, baseline)
    G = returns_to_go(rewards_EK, turn_mask_EK, gamma)
    E, K = G.shape
    e = torch.arange(E, device=G.device).repeat_interleave(K)
    k = torch.arange(K, device=G.device).repeat(E)
    scale = None
    if baseline == "std":
        R = G[:, 0] if gamma == 1.0 else (rewards_EK.to(torch.float64) * turn_mask_EK).sum(dim=1)
        from tether.objectives.advantages import group_mean_std

        _, sd, n = group_mean_std(R, group_E)
        scale = torch.where(n <= 1, torch.ones_like(sd), sd)[e]
    A = relative(G[e, k], _ids(group_E[e], k), e, baseline, eps, scale_N=scale).view(E, K)
    A = A * turn_mask_EK.to(torch.float64)
    return A.to(rewards_EK.dtype if rewards_EK.is_floating_point() else torch.float32)


def gigpo(rewards_EK: Tensor, turn_mask_EK: Tensor, group_E: Tensor, state_EK: Tensor | None = None, *,
          gamma: float = 1.0, omega: float = 1.0, eps: float = 1e-6, baseline: str | None = None) -> Tensor:
    """GiGPO (Feng et al. 2025, arXiv 2505.10978, Eqs. 3, 6-8; verl-agent ``gigpo/core_gigpo.py``):
    ``A_{e,k} = A^E_e + omega A^S_{e,k}``.

    * ``A^E``: the episode advantage of the group (:func:`episode`; one entry per trajectory, the paper's Eq. 3;
      verl-agent's code default ``compute_mean_std_cross_steps=True`` counts each trajectory once per step).
    * ``A^S``: step groups are the group's valid turns with equal ``state_EK`` (any turn index: a state revisited
      later joins the same step group); ``G_{e,k}`` is centred (and under ``"std"`` scaled) within its step group;
      a step group with one entry gives ``A^S = 0`` (verl-agent: its own mean).

    Default ``"std"`` (``mode=mean_std_norm``; verl-agent also has ``mean_norm`` = ``"mean"``); verl-agent's scripts
    use ``gamma=0.95``, ``omega=1``. The step term weights a state's gradient by the chance that another episode
    of the group visits it, so it is biased even with ``"loo"``."""
    baseline = baseline or "std"
    _check(rewards_EK, turn_mask_EK, group_E, state_EK, baseline)
    if state_EK is None:
        raise ValueError("credit: gigpo needs state_EK (anchor-state ids)")
    A_E = _episode_adv(rewards_EK, turn_mask_EK, group_E, baseline, eps)
    G = returns_to_go(rewards_EK, turn_mask_EK, gamma)
    e, k = _valid(turn_mask_EK)
    A_S = relative(G[e, k], _ids(group_E[e], state_EK[e, k]), e, baseline, eps, lone="zero")
    return _scatter(A_E[e] + omega * A_S, e, k, rewards_EK)


def discounted(rewards_EK: Tensor, turn_mask_EK: Tensor, group_E: Tensor, state_EK: Tensor | None = None, *,
               gamma: float = 1.0, omega: float = 1.0, eps: float = 1e-6, baseline: str | None = None) -> Tensor:
    """Discounted step returns normalised within the group (StepPO-style step credit, methods.md §6 (d)3,
    arXiv 2604.18401): ``A_{e,k} = (G_{e,k} - mean_g G) / (std_g G + eps)``, mean and std over *all* valid turns
    of the group's episodes (default ``"std"``). The pooled baseline includes the episode's own later turns and
    its length, so ``"std"``/``"mean"`` are biased; ``"loo"`` (pool of the other episodes' turns) is not."""
    baseline = baseline or "std"
    _check(rewards_EK, turn_mask_EK, group_E, state_EK, baseline)
    G = returns_to_go(rewards_EK, turn_mask_EK, gamma)
    e, k = _valid(turn_mask_EK)
    A = relative(G[e, k], group_E[e], e, baseline, eps)
    return _scatter(A, e, k, rewards_EK)


CREDIT: dict[str, CreditFn] = {"episode": episode, "turn": turn, "turn_unbiased": turn_unbiased, "gigpo": gigpo,
                               "discounted": discounted}


def get_credit(name: str) -> CreditFn:
    try:
        return CREDIT[name]
    except KeyError:
        raise ValueError(f"unknown credit estimator '{name}'; valid: {', '.join(CREDIT)}") from None
