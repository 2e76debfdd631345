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


def sequence_logits(model: torch.nn.Module, tokens_BT: Tensor, attention_mask_BT: Tensor, *,
                    first: int = 0) -> Tensor:
    """``logits_BKV`` (float32) of a right-padded batch at positions ``first .. T-1`` (``K = T - first``),
    for the built-in model or a ``transformers`` LM. Positions before ``first`` still run through the
    transformer (they are context) but skip the output head, whose ``[B, T, V]`` logits dominate the
    memory of a large-vocabulary model (``transformers``' ``logits_to_keep``)."""
    from tether.engine.torch_engine import is_builtin

    T = tokens_BT.shape[1]
    if not 0 <= first < T:
        raise ValueError(f"sequence_logits: first must be in [0, {T}), got {first}")
    if is_builtin(model):
        return model(tokens_BT, keep_from=first)  # right padding: causal attention never looks at the pads
    kw = {"logits_to_keep": T - first} if first and _keeps_logits(model) else {}
    out = model(input_ids=tokens_BT, attention_mask=attention_mask_BT.long(), use_cache=False, return_dict=True, **kw)
    logits = out.logits
    return (logits if logits.shape[1] == T - first else logits[:, first:]).float()


def _keeps_logits(model: torch.nn.Module) -> bool:
    """Whether the (possibly PEFT-wrapped) model's forward takes ``logits_to_keep``."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def token_logprobs(model: torch.nn.Module, rollout: Rollout, *, replay_truncation: bool = True) -> tuple[Tensor, Tensor]:
    """``(logp_BT, entropy_BT)`` aligned with ``rollout.tokens_BT``.

    ``logp_BT[b, t] = log pi(tokens[b, t] | tokens[b, <t])`` under ``softmax(logits / temperature)``
    restricted to the recorded kept set (``replay_truncation=True`` and a truncating rollout) or the
    full vocabulary otherwise; ``entropy_BT`` is the entropy of that same distribution. Both are 0
    outside the completion (``rollout.loss_mask_BT``). ``logp_BT`` is differentiable w.r.t. the model;
    ``entropy_BT`` never is (it is a measurement: no graph is kept for it).

    Only the completion tokens are scored: the head runs from the first completion position on, and
    the log-softmax over the vocabulary runs on the ``N`` completion tokens alone (``[N, V]`` instead
    of ``[B, T, V]``; prompts and padding are most of ``T`` on chat-formatted batches).
    """
    tokens_BT, mask_BT = rollout.tokens_BT, rollout.loss_mask_BT
    B, T = tokens_BT.shape
    first = max(int(rollout.prompt_len_B.min()) - 1, 0)  # the earliest position that predicts a completion token
    logits_BKV = sequence_logits(model, tokens_BT, rollout.attention_mask_BT, first=first)[:, :-1]
    m_BK = mask_BT[:, first + 1:]
    logits_NV = logits_BKV[m_BK]
    kept_N = None
    if replay_truncation and rollout.kept_count_BT is not None:
        kept_N = rollout.kept_count_BT[:, first + 1:][m_BK]
    lp_NV = replay_logprobs(logits_NV, rollout.sampling.temperature, kept_N)
    lp_N = lp_NV.gather(-1, tokens_BT[:, first + 1:][m_BK][:, None])[:, 0]
    with torch.no_grad():
        ent_N = entropy_from_logprobs(lp_NV)
    logp_BT = torch.zeros(B, T, dtype=lp_N.dtype, device=lp_N.device).masked_scatter(mask_BT, lp_N)
    entropy_BT = torch.zeros(B, T, dtype=ent_N.dtype, device=ent_N.device).masked_scatter(mask_BT, ent_N)
    return logp_BT, entropy_BT
