"""How the trainer obtains ``pi_old``: the anchor of the PPO ratio when data is stale (methods.md (a)3).

A token sampled at version ``v`` and trained on at version ``s`` needs ``pi_old^train(v)`` for the
decoupled split ``pi_theta/mu = [pi_theta/pi_old(v)] [pi_old(v)/mu]``. Four strategies, selected by
``TrainConfig.old_logits``; each returns the *anchor* (``LossInputs.logp_old_BT`` and
``logp_prox_BT``):

    recompute  anchor = pi_{theta_s} (current pre-update weights): one forward; exact only when v = s
    snapshot   anchor = pi_{theta_v} per token from stored weights of the last versions: one forward
               per distinct version in the batch; exact (``logp_behave_old_BT`` for the meter too)
    ewma       anchor = pi_ewma, a bias-corrected EWMA of the weights (PPO-EWMA, W' = beta W + 1,
               theta_ewma <- (beta W/W') theta_ewma + theta/W'), updated once per trainer version
    loglinear  anchor = log mu + alpha (sg log pi_theta - log mu), alpha = (v_prox - v)/(v_theta - v)
               with v_prox = s, v_theta = s + 1 (AReaL), computed inside the loss from the training
               forward: no extra forward at all

Costs are logged per step: ``time/old_logits_s`` (seconds spent obtaining the anchor before the
update), ``mem/old_logits_bytes`` (extra weights held: snapshots or the EWMA copy).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from tether.objectives.decoupled import ewma_update, loglinear_prox_logp
from tether.rollout import Rollout
from tether.train.config import OldLogits


def state_bytes(state: Mapping[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def clone_state(model: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class OldLogitSource:
    """Holds what a strategy needs across steps (snapshots, EWMA weights) and computes the anchor.

    ``recompute_fn(model, rollout) -> (logp_BT, entropy_BT)`` is the trainer's teacher-forced
    recomputation (same sampling-transform replay as the loss). ``keep_versions``: how many past
    versions the snapshot strategy retains (the largest token age the loop can admit, plus one).
    """

    def __init__(self, strategy: OldLogits, model: torch.nn.Module, recompute_fn: Callable, *,
                 keep_versions: int, ewma_beta: float = 0.9) -> None:
        self.strategy = OldLogits(strategy)
        self.model = model
        self.recompute_fn = recompute_fn
        self.keep_versions = int(keep_versions)
        self.ewma_beta = float(ewma_beta)
        self.snapshots: dict[int, dict[str, Tensor]] = {}
        self.ewma_weight = 0.0
        self.scratch: torch.nn.Module | None = None
        if self.strategy in (OldLogits.SNAPSHOT, OldLogits.EWMA):
            self.scratch = copy.deepcopy(model).eval()
            for p in self.scratch.parameters():
                p.requires_grad_(False)

    # -- state across versions -------------------------------------------------------------------
    def publish(self, version: int) -> None:
        """Call once the trainer model holds ``version`` (at start and after every update phase)."""
        if self.strategy is OldLogits.SNAPSHOT:
            self.snapshots[version] = clone_state(self.model)
            for v in [v for v in self.snapshots if v <= version - self.keep_versions]:
                del self.snapshots[v]
        elif self.strategy is OldLogits.EWMA:
            assert self.scratch is not None
            ewma = list(self.scratch.parameters())
            new, self.ewma_weight = ewma_update(ewma, [p.detach() for p in self.model.parameters()],
                                                self.ewma_weight, beta=self.ewma_beta)
            with torch.no_grad():
                for dst, src in zip(ewma, new):
                    dst.copy_(src)

    def extra_bytes(self) -> int:
        if self.strategy is OldLogits.SNAPSHOT:
            return sum(state_bytes(s) for s in self.snapshots.values())
        if self.strategy is OldLogits.EWMA:
            assert self.scratch is not None
            return sum(p.numel() * p.element_size() for p in self.scratch.parameters())
        return 0

    def state_dict(self) -> dict:
        out: dict = {"snapshots": self.snapshots, "ewma_weight": self.ewma_weight}
        if self.strategy is OldLogits.EWMA:
            assert self.scratch is not None
            out["ewma"] = clone_state(self.scratch)
        return out

    def load_state_dict(self, state: dict) -> None:
        self.snapshots = {int(k): v for k, v in state["snapshots"].items()}
        self.ewma_weight = float(state["ewma_weight"])
        if "ewma" in state and self.scratch is not None:
            self.scratch.load_state_dict(state["ewma"])

    # -- the anchor ------------------------------------------------------------------------------
    @torch.no_grad()
    def behaviour_logprobs(self, rollout: Rollout) -> Tensor:
        """Exact ``pi_{theta_v}`` of every generated token from the snapshot of its version ``v``."""
        assert self.scratch is not None
        mask_BT = rollout.loss_mask_BT
        out_BT = torch.zeros_like(rollout.logp_mu_BT)
        for v in torch.unique(rollout.version_BT[mask_BT]).tolist():
            if v not in self.snapshots:
                raise KeyError(f"old_logits=snapshot: no stored weights of version {v} (kept: "
                               f"{sorted(self.snapshots)}); raise keep_versions")
            self.scratch.load_state_dict(self.snapshots[v])
            rows = (mask_BT & (rollout.version_BT == v)).any(-1).nonzero().flatten()
            lp_BT, _ = self.recompute_fn(self.scratch, rollout.select(rows))
            sel = mask_BT[rows] & (rollout.version_BT[rows] == v)
            out_BT[rows] = torch.where(sel, lp_BT, out_BT[rows])
        return out_BT

    @torch.no_grad()
    def anchor(self, rollout: Rollout, current_BT: Tensor | None) -> tuple[Tensor | None, Tensor | None, float]:
        """``(anchor_BT, behave_BT, seconds)`` before the update.

        ``current_BT``: pi_{theta_s} if the loop already computed it (the recompute anchor and the
        meter's pi_old). loglinear returns ``None``: its anchor is made per micro-batch by
        :meth:`prox_fn`.
        """
        t0 = time.perf_counter()
        behave = None
        if self.strategy is OldLogits.RECOMPUTE:
            anchor = current_BT if current_BT is not None else self.recompute_fn(self.model, rollout)[0]
        elif self.strategy is OldLogits.SNAPSHOT:
            behave = anchor = self.behaviour_logprobs(rollout)
        elif self.strategy is OldLogits.EWMA:
            assert self.scratch is not None
            anchor = self.recompute_fn(self.scratch, rollout)[0]
        else:
            anchor = None
        return anchor, behave, time.perf_counter() - t0

    def prox_fn(self, rollout: Rollout, current_version: int) -> Callable[[Tensor, Tensor], Tensor] | None:
        """For loglinear: ``(logp_theta_BT of a micro-batch, its row index) -> anchor``; else None."""
        if self.strategy is not OldLogits.LOGLINEAR:
            return None

        def fn(logp_theta_BT: Tensor, rows: Tensor) -> Tensor:
            sub = rollout.select(rows)
            anchor = loglinear_prox_logp(logp_theta_BT, sub.logp_mu_BT, sub.version_BT,
                                         v_theta=current_version + 1, v_prox=current_version)
            return torch.where(sub.loss_mask_BT, anchor, torch.zeros_like(anchor))

        return fn
