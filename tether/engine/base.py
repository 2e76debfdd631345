"""The ``Engine`` protocol: what every rollout engine gives the loops, and what its record means.

The RL loops (``tether/train``), the distillation loop (``tether/distill``) and partial rollouts
(:func:`tether.engine.partial.generate_partial`) use an engine through these members only, so any
object that has them plugs in: :class:`~tether.engine.torch_engine.TorchEngine` (built-in or
Hugging Face model), :class:`~tether.engine.precision.PrecisionEngine` (reduced-precision numerics)
and :class:`~tether.engine.vllm_engine.VLLMEngine` (a vLLM server). ``tests/engine/test_engine_contract.py``
runs one suite of contract tests against each of them.

What :meth:`Engine.generate` promises about the :class:`~tether.rollout.Rollout` it returns
(``B`` = rows, ``T`` = longest prompt + completion):

* rows are prompt-major (``n`` consecutive rows per prompt); ``tokens_BT`` is prompt then
  completion, right-padded with ``pad_id``; the masks (``loss_mask_BT``, ``attention_mask_BT``)
  follow from ``prompt_len_B`` and ``completion_len_B`` alone, never from token identity, so a
  ``pad_id`` equal to an EOS id cannot hide the real EOS;
* a row stops after it generates one of ``eos_ids`` (kept in the completion, ``finished_B`` True)
  or after ``max_new_tokens`` tokens (``finished_B`` False);
* ``logp_mu_BT[b, t]`` is ``log mu(token_t | tokens_<t)``, the log-probability of the sampled token
  under the distribution the engine actually sampled from (after temperature, top-k, top-p:
  :func:`tether.engine.sampling.sampling_logprobs`), finite and <= 0 on completion tokens and 0
  elsewhere. The trainer recomputes ``log pi_old`` itself; their gap is the mismatch the meter reports;
* ``version_BT[b, t]`` is the weight version that sampled token ``t`` (``version`` at the time of the
  call) and -1 outside the completion;
* ``kept_count_BT`` is the size of the truncated support each completion token was sampled from
  (top-k / top-p; ``vocab_size`` outside the completion), so the trainer can replay the truncation;
  None when the sampling parameters do not truncate;
* the same prompts, parameters, seed and weights give the same rollout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

from torch import Tensor

from tether.rollout import Rollout, SamplingParams


@runtime_checkable
class Engine(Protocol):
    """A rollout engine (module docstring). ``isinstance(x, Engine)`` checks that every member exists."""

    version: int
    """The weight version every token generated from now on records in ``version_BT``: the version of
    the last weights the engine actually loaded (see :meth:`load_weights`)."""
    pad_id: int
    """Filler token id of the padding in ``tokens_BT`` (masks never depend on it)."""
    vocab_size: int
    """Size of the vocabulary the engine samples from; equal to the trainer's (log-probs of the same ids)."""
    eos_ids: tuple[int, ...]
    """The stop ids, non-empty: a row stops after generating any of them."""

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *, seed: int,
                 group_B: Tensor | None = None, n: int = 1) -> Rollout:
        """Sample ``n`` completions per prompt (token ids; each prompt non-empty) under ``params``, with
        all randomness drawn from ``seed``. Returns a right-padded :class:`Rollout` of ``len(prompts) * n``
        rows, prompt-major, with the provenance the module docstring lists. ``group_B`` (one entry per
        row) is stored as the rows' group ids; default: the prompt index. Raises ``ValueError`` for
        ``n < 1``, no prompts, an empty prompt, or prompt + ``max_new_tokens`` beyond the model's length."""
        ...

    def load_weights(self, state_dict: Mapping[str, Tensor], version: int) -> None:
        """Take the trainer's weights (``model.state_dict()`` names and shapes) as weight version
        ``version``. Afterwards :attr:`version` is ``version`` and generation uses these weights; an
        engine that pushes only every k-th version (``VLLMOptions.sync_every``) keeps the weights and
        the version it last pushed, so the tokens' recorded version stays true."""
        ...

    def close(self) -> None:
        """Release what the engine holds (a server process, temporary files); idempotent. The loops
        call it at the end of a run; an in-process engine may do nothing."""
        ...
