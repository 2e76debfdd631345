"""The record that flows from the engine to the trainer.

Every token carries its provenance: the behaviour log-probability ``logp_mu`` under the
distribution the engine actually sampled from (after temperature and truncation), the weight
version that produced it, and enough of the sampling transform to replay it in the trainer.

Layout: one row per sequence, ``tokens_BT`` = prompt followed by completion, right-padded.
Per-token tensors are aligned with ``tokens_BT``: entry ``t`` describes token ``t`` given the
tokens before it. ``loss_mask_BT`` is built from positions (prompt length and completion length),
never from token identity, so a pad id equal to the EOS id cannot hide the real EOS.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    """Softmax temperature (> 0)."""
    top_k: int | None = None
    """Keep the k most likely tokens (None: no top-k)."""
    top_p: float | None = None
    """Keep the smallest set with cumulative probability >= top_p (None: no top-p)."""
    max_new_tokens: int = 32
    """Generation stops after this many new tokens."""
    stop: tuple[str, ...] = ()
    """Stop strings: a row stops once its completion ends with one of them (kept in the completion)."""

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"SamplingParams.temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"SamplingParams.top_k must be >= 1 or None, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1] or None, got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if isinstance(self.stop, str) or any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"SamplingParams.stop must be a tuple of non-empty strings, got {self.stop!r}")

    @property
    def truncates(self) -> bool:
        return self.top_k is not None or (self.top_p is not None and self.top_p < 1.0)


@dataclass
class Rollout:
    tokens_BT: Tensor
    """Prompt + completion token ids, right-padded, ``long``."""
    prompt_len_B: Tensor
    """Number of prompt tokens of each row."""
    completion_len_B: Tensor
    """Number of generated tokens of each row (EOS included when generated)."""
    logp_mu_BT: Tensor
    """log mu(token_t | tokens_<t) under the sampled distribution; 0 outside the completion."""
    version_BT: Tensor
    """Weight version that generated token t; -1 outside the completion."""
    kept_count_BT: Tensor | None = None
    """Size of the truncated support (top-k / top-p) token t was sampled from; None without truncation."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    group_B: Tensor | None = None
    """Group (prompt) id of each row; rows of one group share a prompt."""
    finished_B: Tensor | None = None
    """True where the row stopped on EOS / a stop string rather than the length limit."""

    @property
    def batch_size(self) -> int:
        return self.tokens_BT.shape[0]

    @property
    def attention_mask_BT(self) -> Tensor:
        total = self.prompt_len_B + self.completion_len_B
        pos = torch.arange(self.tokens_BT.shape[1], device=self.tokens_BT.device)
        return pos[None, :] < total[:, None]

    @property
    def loss_mask_BT(self) -> Tensor:
        """True on generated tokens, from positions only."""
        pos = torch.arange(self.tokens_BT.shape[1], device=self.tokens_BT.device)
        start = self.prompt_len_B[:, None]
        return (pos[None, :] >= start) & (pos[None, :] < start + self.completion_len_B[:, None])

    def select(self, index_B: Tensor) -> Rollout:
        """Rows ``index_B`` of this rollout (a new record)."""
        def pick(x):
            return None if x is None else x[index_B]

        return replace(
            self,
            tokens_BT=self.tokens_BT[index_B],
            prompt_len_B=self.prompt_len_B[index_B],
            completion_len_B=self.completion_len_B[index_B],
            logp_mu_BT=self.logp_mu_BT[index_B],
            version_BT=self.version_BT[index_B],
            kept_count_BT=pick(self.kept_count_BT),
            group_B=pick(self.group_B),
            finished_B=pick(self.finished_B),
        )
