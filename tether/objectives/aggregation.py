"""Loss aggregation: one function, four named modes (verl ``agg_loss``; DESIGN habit 3).

With per-token losses ``l_{i,t}`` and mask ``m_{i,t}``:

- ``token-mean``:               ``sum_{i,t} m l / N_tok``
- ``seq-mean-token-mean``:      ``sum_i (sum_t m l / sum_t m) / N_seq``
- ``seq-mean-token-sum``:       ``sum_i sum_t m l / N_seq``
- ``seq-mean-token-sum-norm``:  ``sum_i sum_t m l / (N_seq * L)`` with a constant ``L`` (Dr.GRPO)

``N_tok`` and ``N_seq`` are *global* counts over the optimiser step (all micro-batches); they
default to the counts in the tensors given (``N_seq`` counts sequences with at least one loss
token). Because every term is a per-sequence quantity divided by a global constant, the sum of
the micro-batch losses equals the whole-batch loss, and so do the gradients.

Note on ``seq-mean-token-sum-norm``: verl divides by ``L`` only (not by the number of
sequences); tether keeps the ``seq-mean`` in the name honest and divides by ``N_seq * L``.
To reproduce verl's scale multiply by ``N_seq`` (or the learning rate).
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

import torch
from torch import Tensor

from tether.objectives.inputs import float_mask

E = TypeVar("E", bound=Enum)


def parse_choice(enum_cls: type[E], value: str | E, what: str) -> E:
    """``enum_cls(value)``, or a ``ValueError`` naming ``what`` and listing the valid values."""
    try:
        return enum_cls(value)
    except ValueError:
        valid = ", ".join(m.value for m in enum_cls)
        raise ValueError(f"unknown {what} '{value}'; valid: {valid}") from None


class AggMode(str, Enum):
    TOKEN_MEAN = "token-mean"
    SEQ_MEAN_TOKEN_MEAN = "seq-mean-token-mean"
    SEQ_MEAN_TOKEN_SUM = "seq-mean-token-sum"
    SEQ_MEAN_TOKEN_SUM_NORM = "seq-mean-token-sum-norm"

    @classmethod
    def parse(cls, value: str | AggMode) -> AggMode:
        return parse_choice(cls, value, "aggregation mode")


def count_tokens(mask_BT: Tensor) -> Tensor:
    """Number of loss tokens (the local ``N_tok``), float64."""
    return mask_BT.count_nonzero().to(torch.float64)


def count_sequences(mask_BT: Tensor) -> Tensor:
    """Number of sequences with at least one loss token (the local ``N_seq``), float64."""
    return _count_rows(_row_lengths(mask_BT.bool()))


def _row_lengths(valid_BT: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Loss tokens per row as ``dtype`` (exact below 2^24 per row); the bool mask is read as bytes."""
    return float_mask(valid_BT, dtype).sum(-1)


def _count_rows(len_B: Tensor) -> Tensor:
    return (len_B > 0).count_nonzero().to(torch.float64)


def _as_denominator(value: float | Tensor | None, default: Tensor | None, like: Tensor) -> Tensor:
    d = default if value is None else torch.as_tensor(value, dtype=torch.float64)
    return d.clamp(min=1.0).to(dtype=like.dtype, device=like.device)


def aggregate(
    loss_BT: Tensor,
    mask_BT: Tensor,
    mode: str | AggMode = AggMode.TOKEN_MEAN,
    *,
    num_tokens: float | Tensor | None = None,
    num_seqs: float | Tensor | None = None,
    horizon: int | None = None,
) -> Tensor:
    """Reduce a per-token loss ``[B, T]`` to a scalar with the named mode (see module doc)."""
    mode = AggMode.parse(mode)
    valid = mask_BT.bool()
    masked = torch.where(valid, loss_BT, 0.0)
    if mode is AggMode.TOKEN_MEAN:
        n_tok = None if num_tokens is not None else count_tokens(valid)
        return masked.sum() / _as_denominator(num_tokens, n_tok, loss_BT)
    len_B = _row_lengths(valid, loss_BT.dtype)
    n_seq = _as_denominator(num_seqs, None if num_seqs is not None else _count_rows(len_B), loss_BT)
    seq_sum_B = masked.sum(-1)
    if mode is AggMode.SEQ_MEAN_TOKEN_MEAN:
        return (seq_sum_B / len_B.clamp(min=1.0)).sum() / n_seq
    if mode is AggMode.SEQ_MEAN_TOKEN_SUM:
        return seq_sum_B.sum() / n_seq
    length = loss_BT.shape[-1] if horizon is None else horizon
    if length < 1:
        raise ValueError(f"aggregate: horizon must be >= 1, got {length}")
    return seq_sum_B.sum() / (n_seq * length)
