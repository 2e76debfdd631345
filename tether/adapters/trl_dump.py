"""``LogProbDump``: a TRL callback that writes per-token log-prob dumps ``tether meter`` reads.

Pass it in ``callbacks=`` of a ``TetherGRPOTrainer``; each training micro-batch's sequences are
appended to a JSONL file at the end of each optimiser step, one sequence per line, in the columns of
``tether.meter.dump`` (docs/meter.md):

    logp_mu          vLLM's sampling log-probs (``sampling_per_token_logps``); without vLLM the trainer
                     sampled the tokens itself and this is ``logp_behave_old``
    logp_old         the trainer's log-probs at the current weights (before this step's update)
    logp_behave_old  the trainer's log-probs at the weights that generated the batch
                     (``old_per_token_logps``; the current ones when TRL skipped them)
    entropy          the trainer's per-token entropy (nats)
    mask             TRL's completion x tool mask, one 0/1 per position
    step             TRL's global step (an extra column ``tether meter`` ignores)

With several processes, process ``k > 0`` writes ``NAME.rankK.jsonl`` beside ``NAME.jsonl``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor
from transformers import TrainerCallback


class LogProbDump(TrainerCallback):
    """Append each training micro-batch's per-token log-probs to ``path`` (module docstring).

    ``every``: write the batches of every ``every``-th optimiser step only (1: all)."""

    def __init__(self, path: str | Path, *, every: int = 1) -> None:
        if every < 1:
            raise ValueError(f"LogProbDump: every must be >= 1, got {every}")
        self.path = Path(path)
        self.every = every
        self._rows: list[dict[str, Any]] = []

    def record_batch(self, *, step: int, mask_BT: Tensor, logp_current_BT: Tensor, logp_behave_old_BT: Tensor | None,
                     logp_mu_BT: Tensor | None, entropy_BT: Tensor | None) -> None:
        """Keep one micro-batch (called by ``TetherGRPOTrainer``; tensors ``[B, T]``)."""
        if step % self.every:
            return
        behave = logp_current_BT if logp_behave_old_BT is None else logp_behave_old_BT
        cols = {"logp_mu": behave if logp_mu_BT is None else logp_mu_BT, "logp_old": logp_current_BT,
                "logp_behave_old": behave, "entropy": entropy_BT, "mask": mask_BT}
        lists = {k: v.detach().float().cpu().tolist() for k, v in cols.items() if v is not None}
        lists["mask"] = [[int(x) for x in row] for row in lists["mask"]]
        for b in range(mask_BT.shape[0]):
            self._rows.append({"step": step, **{k: v[b] for k, v in lists.items()}})

    def _file(self, process_index: int) -> Path:
        if process_index == 0:
            return self.path
        return self.path.with_name(f"{self.path.stem}.rank{process_index}{self.path.suffix}")

    def on_step_end(self, args, state, control, **kwargs):
        if self._rows:
            path = self._file(args.process_index)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in self._rows)
            self._rows = []
        return control
