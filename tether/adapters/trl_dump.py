"""``LogProbDump``: a TRL callback that writes per-token log-prob dumps ``tether meter`` reads.

With a ``TetherGRPOTrainer``, pass it in ``callbacks=``. With TRL's own, unmodified ``GRPOTrainer`` add one
line after building the trainer::

    LogProbDump("logprobs.jsonl").attach(trainer)

``attach`` registers the callback and wraps the trainer's ``_compute_loss`` (on that instance only) so
that each training micro-batch's ``inputs`` and the log-probs and entropies TRL's own loss computes are
handed to the dump; TRL's loss, gradient and logs are unchanged. A ``LogProbDump`` that nothing feeds (in
``callbacks=`` of a stock ``GRPOTrainer`` without ``attach``) is an error when training begins, never an
empty file.

Each training micro-batch's sequences are appended to a JSONL file at the end of each optimiser step,
one sequence per line, in the columns of ``tether.meter.dump`` (docs/meter.md):

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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
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
        self.fed_by: str | None = None
        """The trainer class that hands this dump its micro-batches (``None``: nothing does yet)."""

    def attach(self, trainer: Any) -> LogProbDump:
        """Feed this dump from ``trainer`` (module docstring) and register it as its callback; returns ``self``.

        A ``TetherGRPOTrainer`` feeds its dumps itself. Any other ``GRPOTrainer`` gets its ``_compute_loss``
        wrapped once per instance (``feed_from_trl_loss``); attaching several dumps shares that wrapper."""
        if not hasattr(trainer, "tether_dumps"):
            feed_from_trl_loss(trainer)
        if self not in trainer.tether_dumps:
            trainer.tether_dumps.append(self)
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self.fed_by = type(trainer).__name__
        return self

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

    def on_train_begin(self, args, state, control, **kwargs):
        if self.fed_by is None:
            raise ValueError(f"LogProbDump({str(self.path)!r}) is a callback of a trainer that does not give it the "
                             "log-probs: with TRL's own GRPOTrainer, call LogProbDump(path).attach(trainer) after "
                             "building the trainer (or train with tether.adapters.trl.TetherGRPOTrainer)")
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self._rows:
            path = self._file(args.process_index)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in self._rows)
            self._rows = []
        return control


def dump_columns(inputs: Mapping[str, Any], logp_BT: Tensor, entropy_BT: Tensor | None) -> dict[str, Tensor | None]:
    """``record_batch``'s tensors from TRL's ``inputs`` and the log-probs / entropies of TRL's loss forward.

    ``mask``: ``completion_mask * tool_mask``; ``logp_behave_old``: ``old_per_token_logps`` (``None`` when TRL
    skipped them: on-policy); ``logp_mu``: ``sampling_per_token_logps`` (vLLM; ``None`` without it), tokens vLLM
    could not score (NaN) taking the behaviour log-probs, as in ``TetherGRPOTrainer``."""
    mask = inputs["completion_mask"]
    if inputs.get("tool_mask") is not None:
        mask = mask * inputs["tool_mask"]
    current = logp_BT.detach()
    behave = inputs.get("old_per_token_logps")
    mu = inputs.get("sampling_per_token_logps")
    if mu is not None:
        mu = torch.where(torch.isnan(mu), current if behave is None else behave, mu)
    return {"mask_BT": mask, "logp_current_BT": current, "logp_behave_old_BT": behave, "logp_mu_BT": mu,
            "entropy_BT": entropy_BT}


def feed_from_trl_loss(trainer: Any) -> None:
    """Wrap ``trainer._compute_loss`` (this instance only) so every training micro-batch reaches each dump in
    ``trainer.tether_dumps`` (created here, empty).

    During the wrapped call, the one log-prob forward TRL's loss makes (``_get_per_token_logps_and_entropies``
    with ``compute_entropy=True``) is recorded; its log-probs and entropies, with ``inputs``, go to
    ``dump_columns``. The loss TRL returns is passed through untouched."""
    forward, compute_loss = trainer._get_per_token_logps_and_entropies, trainer._compute_loss
    seen: list[tuple[Tensor, Tensor | None]] = []
    recording = [False]

    def recorded_forward(*args: Any, **kwargs: Any):
        out = forward(*args, **kwargs)
        if recording[0]:
            seen.append((out[0], out[1]))
        return out

    def loss_feeding_dumps(model: Any, inputs: Mapping[str, Any]) -> Tensor:
        seen.clear()
        recording[0] = True
        try:
            loss = compute_loss(model, inputs)
        finally:
            recording[0] = False
        forwards, n = (seen[0] if seen else None), len(seen)
        seen.clear()  # hold no graph past this call
        if n != 1:
            raise RuntimeError(f"LogProbDump: TRL's _compute_loss made {n} log-prob forwards, expected one; "
                               "this TRL version is not supported by LogProbDump.attach")
        if trainer.model.training:
            for dump in trainer.tether_dumps:
                dump.record_batch(step=trainer.state.global_step, **dump_columns(inputs, *forwards))
        return loss

    trainer.tether_dumps = []
    trainer._get_per_token_logps_and_entropies = recorded_forward
    trainer._compute_loss = loss_feeding_dumps
