"""The record that flows from the engine to the trainer.

Every token carries its provenance: the behaviour log-probability ``logp_mu`` under the
distribution the engine actually sampled from (after temperature and truncation), the weight
version that produced it, and enough of the sampling transform to replay it in the trainer.

Layout: one row per sequence, ``tokens_BT`` = prompt followed by completion, right-padded.
Per-token tensors are aligned with ``tokens_BT``: entry ``t`` describes token ``t`` given the
tokens before it. ``loss_mask_BT`` is built from provenance (``source_BT == Source.POLICY``) or, for a
single-turn row, from positions (prompt length and completion length), never from token identity, so a
pad id equal to the EOS id cannot hide the real EOS.

A multi-turn episode (``tether.agent``) is one row: the first observation (the prompt), then each turn's
sampled action followed by the environment's or tool's reply, appended as tokens (never re-tokenised).
``source_BT`` says who produced every token (prompt / policy / env / tool / teacher / cache), ``turn_BT``
which turn it belongs to and ``policy_id_BT`` which policy sampled it; single-turn RL is the one-turn case
(``source_BT`` None: prompt, then policy tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import IntEnum

import torch
from torch import Tensor


class Source(IntEnum):
    """Who produced a token (``Rollout.source_BT``). Only ``POLICY`` and ``CACHE`` tokens enter the RL loss."""
    PAD = -1
    """Right padding (outside the attention mask)."""
    PROMPT = 0
    """The first observation: the task's prompt or the environment's reset text."""
    POLICY = 1
    """Sampled by the policy being trained (the engine); carries ``logp_mu`` and a version."""
    ENV = 2
    """The environment's reply to an action (feedback, the next state)."""
    TOOL = 3
    """A tool's output (a calculator result, a search hit)."""
    TEACHER = 4
    """Sampled by a teacher or expert policy (DAgger, expert turns): not the trained policy's action."""
    CACHE = 5
    """Replayed from a cache of earlier trajectories (BEPA): in the loss, with the ``logp_mu`` it was recorded with."""
    REPLAY = 6
    """The policy's own actions kept as context only, never in the loss: a fork's replayed prefix (Fission-GRPO,
    ``tether.agent.fission``: earlier actions replayed to restore a state), or, in the update's copy of a batch
    only, the turns DART's entropy selection leaves out (``tether.agent.dart``)."""


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
    source_BT: Tensor | None = None
    """``Source`` of every token (``int8``; ``PAD`` outside the attention mask); None: a single-turn row
    (prompt, then policy tokens)."""
    turn_BT: Tensor | None = None
    """Turn index of every token (the action of turn k and the reply to it carry k; -1 on the prompt and
    padding); None: single-turn."""
    policy_id_BT: Tensor | None = None
    """Which policy produced every token (0: the trained policy; others are the caller's ids, e.g. a
    teacher); -1 where no policy did (prompt, env, tool, padding). None: single-turn."""

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
        """True on the tokens the trained policy sampled or replays: ``source_BT`` POLICY or CACHE (BEPA's injected
        trajectories) when the row records its provenance, else the completion's positions. Never from token
        identity."""
        if self.source_BT is not None:
            return (self.source_BT == Source.POLICY) | (self.source_BT == Source.CACHE)
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
            source_BT=pick(self.source_BT),
            turn_BT=pick(self.turn_BT),
            policy_id_BT=pick(self.policy_id_BT),
        )

    @property
    def sources_BT(self) -> Tensor:
        """``source_BT``, or for a single-turn row the provenance its positions imply."""
        if self.source_BT is not None:
            return self.source_BT
        out = torch.full(self.tokens_BT.shape, int(Source.PAD), dtype=torch.int8, device=self.tokens_BT.device)
        out[self.attention_mask_BT] = int(Source.PROMPT)
        out[self.loss_mask_BT] = int(Source.POLICY)
        return out


def concat_rows(rollouts: list[Rollout], *, pad_id: int, vocab_size: int) -> Rollout:
    """The rows of ``rollouts`` stacked in order as one record, right-padded to the longest row.

    Padding follows the record's conventions (``pad_id`` tokens, ``logp_mu`` 0, version -1, kept count
    ``vocab_size``, source ``PAD``, turn and policy id -1); masks come from the lengths or the provenance, so
    padding never enters a loss. Group ids are shifted so the groups of different parts stay distinct. All
    parts share one ``sampling``. When any part records provenance, the single-turn parts get theirs from
    their positions (``sources_BT``).
    """
    T = max(r.tokens_BT.shape[1] for r in rollouts)

    def cat(get, fill):
        parts = [get(r) for r in rollouts]
        if any(p is None for p in parts):
            return None
        return torch.cat([torch.nn.functional.pad(p, (0, T - p.shape[1]), value=fill) if p.dim() == 2 else p
                          for p in parts])

    multi = any(r.source_BT is not None for r in rollouts)

    def one_turn(r: Rollout, fill_policy: int) -> Tensor:  # turn / policy id a single-turn row implies
        out = torch.full(r.tokens_BT.shape, -1, dtype=torch.long, device=r.tokens_BT.device)
        out[r.loss_mask_BT] = fill_policy
        return out

    groups, offset = [], 0
    for r in rollouts:
        g = r.group_B if r.group_B is not None else torch.arange(r.batch_size)
        groups.append(g + offset)
        offset += int(g.max()) + 1 if g.numel() else 0
    return replace(
        rollouts[0],
        tokens_BT=cat(lambda r: r.tokens_BT, pad_id),
        prompt_len_B=cat(lambda r: r.prompt_len_B, 0),
        completion_len_B=cat(lambda r: r.completion_len_B, 0),
        logp_mu_BT=cat(lambda r: r.logp_mu_BT, 0.0),
        version_BT=cat(lambda r: r.version_BT, -1),
        kept_count_BT=cat(lambda r: r.kept_count_BT, vocab_size),
        group_B=torch.cat(groups),
        finished_B=cat(lambda r: r.finished_B, False),
        source_BT=cat(lambda r: r.sources_BT, int(Source.PAD)) if multi else None,
        turn_BT=cat(lambda r: r.turn_BT if r.turn_BT is not None else one_turn(r, 0), -1) if multi else None,
        policy_id_BT=(cat(lambda r: r.policy_id_BT if r.policy_id_BT is not None else one_turn(r, 0), -1)
                      if multi else None),
    )
