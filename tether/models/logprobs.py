"""Trainer-side teacher-forced recomputation of the log-probs of a rollout's tokens.

Applies the rollout's own sampling transform (temperature, and with ``replay_truncation`` the
recorded top-k/top-p support, :func:`tether.engine.sampling.replay_logprobs`), so at equal weights
it reproduces the engine's ``logp_mu`` up to floating-point noise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tether.engine.sampling import entropy_from_logprobs, replay_logprobs
from tether.rollout import Rollout


def sequence_logits(model: torch.nn.Module, tokens_BT: Tensor, attention_mask_BT: Tensor) -> Tensor:
    """``logits_BTV`` (float32) of a right-padded batch, for the built-in model or a ``transformers`` LM."""
    from tether.engine.torch_engine import is_builtin

    if is_builtin(model):
        return model(tokens_BT)  # right padding: causal attention never looks at the pads
    out = model(input_ids=tokens_BT, attention_mask=attention_mask_BT.long(), use_cache=False, return_dict=True)
    return out.logits.float()


def token_logprobs(model: torch.nn.Module, rollout: Rollout, *, replay_truncation: bool = True) -> tuple[Tensor, Tensor]:
    """``(logp_BT, entropy_BT)`` aligned with ``rollout.tokens_BT``.

    ``logp_BT[b, t] = log pi(tokens[b, t] | tokens[b, <t])`` under ``softmax(logits / temperature)``
    restricted to the recorded kept set (``replay_truncation=True`` and a truncating rollout) or the
    full vocabulary otherwise; ``entropy_BT`` is the entropy of that same distribution. Both are 0
    outside the completion (``rollout.loss_mask_BT``). Differentiable w.r.t. the model.
    """
    tokens_BT = rollout.tokens_BT
    logits_BTV = sequence_logits(model, tokens_BT, rollout.attention_mask_BT)[:, :-1]
    kept = None
    if replay_truncation and rollout.kept_count_BT is not None:
        kept = rollout.kept_count_BT[:, 1:]
    lp_BTV = replay_logprobs(logits_BTV, rollout.sampling.temperature, kept)
    mask_BT = rollout.loss_mask_BT
    lp_tok = lp_BTV.gather(-1, tokens_BT[:, 1:, None])[..., 0]
    ent = entropy_from_logprobs(lp_BTV)
    zero = lp_tok.new_zeros(tokens_BT.shape[0], 1)
    logp_BT = torch.where(mask_BT, torch.cat([zero, lp_tok], 1), 0.0)
    entropy_BT = torch.where(mask_BT, torch.cat([zero, ent], 1), 0.0)
    return logp_BT, entropy_BT
