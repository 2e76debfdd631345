"""Batched autoregressive sampling with a KV cache, recording the behaviour distribution.

``TorchEngine`` drives either the built-in :class:`~tether.models.tiny.TinyLM` (preallocated cache)
or any ``transformers`` causal LM: a Llama-layout one (Llama, SmolLM2, Qwen2, Qwen3, Mistral) through the lean
decode path of :mod:`tether.engine.lean_llama` (fused weights, preallocated cache) unless ``lean=False``,
any other through its stock forward and ``past_key_values`` cache (the reason is logged once). Prompts are left-padded
inside the engine (positions from the prompt start, padding masked out of attention); the returned
:class:`~tether.rollout.Rollout` is right-padded, with masks from ``(prompt_len_B, completion_len_B)``
only, so a pad id equal to the EOS id cannot hide the real EOS.

For every generated token it records ``logp_mu`` under the distribution actually sampled from
(after temperature, top-k, top-p: :func:`tether.engine.sampling.sampling_logprobs`), the kept
count of that truncation (for :func:`~tether.engine.sampling.replay_logprobs`) and the weight
version. Sampling noise comes from one ``torch.Generator`` seeded explicitly: same seed, weights
and prompts give the same tokens.
"""

from __future__ import annotations

import copy as copy_module
import logging
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from tether.engine import lean_llama
from tether.engine.sampling import sample_from_logprobs, sampling_logprobs
from tether.rollout import Rollout, SamplingParams

log = logging.getLogger("tether.engine")


def is_builtin(model) -> bool:
    from tether.models.tiny import TinyLM

    return isinstance(model, TinyLM)


class _BuiltinStepper:
    """Prefill + one-token steps for :class:`TinyLM` over a preallocated :class:`KVCache`."""

    def __init__(self, model, batch: int, max_len: int) -> None:
        self.model = model
        self.cache = model.new_cache(batch, max_len)
        self.fast = model.is_fused()  # the lean one-token path needs the fused projection weights

    def prefill(self, tokens_BP: Tensor, valid_BP: Tensor, positions_BP: Tensor) -> Tensor:
        return self.model(tokens_BP, positions_BT=positions_BP, key_valid_BT=valid_BP, cache=self.cache,
                          last_only=True)[:, 0]

    def step(self, tokens_B: Tensor, positions_B: Tensor) -> Tensor:
        if self.fast:
            return self.model.decode_step(tokens_B, positions_B, self.cache)
        return self.model(tokens_B[:, None], positions_BT=positions_B[:, None], cache=self.cache)[:, 0]


class _HFStepper:
    """Prefill + one-token steps for a ``transformers`` causal LM through ``past_key_values``."""

    def __init__(self, model, batch: int, max_len: int) -> None:
        import inspect

        self.model = model
        self.cache = None
        self.attn_BS = None
        params = inspect.signature(model.forward).parameters
        # transformers >= 5.x names the cache argument `cache`; older releases `past_key_values`
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def _call(self, ids, positions):
        out = self.model(input_ids=ids, attention_mask=self.attn_BS, position_ids=positions, use_cache=True,
                         return_dict=True, **{self.cache_arg: self.cache}, **self.extra)
        self.cache = getattr(out, self.cache_arg)
        return out.logits[:, -1].float()

    def prefill(self, tokens_BP: Tensor, valid_BP: Tensor, positions_BP: Tensor) -> Tensor:
        self.attn_BS = valid_BP.long()
        return self._call(tokens_BP, positions_BP)

    def step(self, tokens_B: Tensor, positions_B: Tensor) -> Tensor:
        self.attn_BS = torch.cat([self.attn_BS, self.attn_BS.new_ones(self.attn_BS.shape[0], 1)], dim=1)
        return self._call(tokens_B[:, None], positions_B[:, None])


def eos_ids(eos: int | Sequence[int]) -> tuple[int, ...]:
    """The stop ids as a non-empty tuple of ints (one id or several; duplicates removed, order kept)."""
    ids = (eos,) if isinstance(eos, int) or (isinstance(eos, Tensor) and eos.dim() == 0) else tuple(eos)
    out = tuple(dict.fromkeys(int(i) for i in ids))
    if not out:
        raise ValueError("TorchEngine: eos_id must name at least one token id")
    return out


class TorchEngine:
    """Rollout engine over a torch model it owns (an :class:`~tether.engine.base.Engine`).

    Args:
        model: a :class:`TinyLM` or a ``transformers`` causal LM. The engine uses it as given
            (pass ``copy=True`` to keep a private copy, so trainer updates reach it only via
            :meth:`load_weights`).
        eos_id: the end-of-sequence id, or several (a row stops after generating any of them: instruct
            models often list more than one, e.g. end-of-turn and end-of-text).
        pad_id: filler for padding (defaults to the first EOS id; masks never depend on it).
        dtype: run the engine's model in this dtype (e.g. ``torch.bfloat16``); sampling maths stays
            float32. Default: the model's dtype.
        encode: ``str -> list[int]``, needed only to turn ``SamplingParams.stop`` strings into token
            sequences (matched on ids, so exact for character tokenizers; for BPE tokenizers only
            the canonical tokenisation of the stop string is matched).
        version: initial weight version.
        lean: decode a supported ``transformers`` model (:data:`~tether.engine.lean_llama.SUPPORTED`)
            on the lean path (default); ``False`` forces the stock forward. :attr:`decode_path` says
            which path the last :meth:`generate` took, :attr:`lean_reason` why it was not the lean one.
    """

    def __init__(self, model: torch.nn.Module, *, eos_id: int | Sequence[int], pad_id: int | None = None,
                 dtype: torch.dtype | None = None, copy: bool = False,
                 encode: Callable[[str], list[int]] | None = None, version: int = 0, lean: bool = True) -> None:
        if copy:
            model = copy_module.deepcopy(model)
        if dtype is not None:
            model = model.to(dtype)
        self.model = model.eval()  # sampling runs under inference_mode; requires_grad is left alone
        self.eos_ids = eos_ids(eos_id)
        self.eos_id = self.eos_ids[0]
        self.pad_id = self.eos_id if pad_id is None else int(pad_id)
        self.encode = encode
        self.version = int(version)
        self._builtin = is_builtin(model)
        if self._builtin:
            model.fuse_projections_()
        p = next(self.model.parameters())
        self.device = p.device
        self.vocab_size = model.config.vocab_size
        self.lean = bool(lean)
        self._lean_weights: lean_llama.LeanWeights | None = None
        self._lean_static = None if self._builtin or not self.lean else lean_llama.structural_reason(model)
        self._logged: set[str] = set()
        self.decode_path: str | None = None
        """``"builtin"``, ``"lean"`` or ``"stock"``: the path of the last :meth:`generate` (None before)."""
        self.lean_reason: str | None = None
        """Why the last :meth:`generate` of a ``transformers`` model did not take the lean path (None if it did)."""

    @property
    def max_len(self) -> int | None:
        cfg = self.model.config
        return getattr(cfg, "max_len", None) or getattr(cfg, "max_position_embeddings", None) or getattr(
            cfg, "n_positions", None)

    @torch.no_grad()
    def load_weights(self, state_dict: Mapping[str, Tensor], version: int) -> None:
        """Copy ``state_dict`` into the engine's model in place (cast to its dtype) and set the
        weight version of every token generated from now on. Keys must match exactly."""
        own = self.model.state_dict()
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if missing or unexpected:
            raise KeyError(f"TorchEngine.load_weights: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
        for k, dst in own.items():
            src = state_dict[k]
            if src.shape != dst.shape:
                raise ValueError(f"TorchEngine.load_weights: {k} has shape {tuple(src.shape)}, "
                                 f"engine expects {tuple(dst.shape)}")
            if src.data_ptr() != dst.data_ptr():
                dst.copy_(src)
        self._lean_weights = None  # the fused copy is rebuilt from the new weights at the next generate
        self.version = int(version)

    def _stepper(self, batch: int, max_len: int):
        """The prefill/step driver of one call: built-in, lean (fused weights rebuilt when any parameter
        changed since they were read) or the stock ``transformers`` forward."""
        if self._builtin:
            self.decode_path, self.lean_reason = "builtin", None
            return _BuiltinStepper(self.model, batch, max_len)
        reason = "disabled (lean=False)" if not self.lean else (
            self._lean_static or lean_llama.call_reason(self.model, max_len))
        if reason is None:
            w = self._lean_weights
            if w is None or w.stale(self.model):
                w = self._lean_weights = lean_llama.LeanWeights(self.model)
            self.decode_path, self.lean_reason = "lean", None
            return lean_llama.LeanStepper(w, batch, max_len)
        if self.lean and reason not in self._logged:
            self._logged.add(reason)
            log.warning("TorchEngine: %s decodes with the stock transformers forward: %s",
                        type(self.model).__name__, reason)
        self.decode_path, self.lean_reason = "stock", reason
        return _HFStepper(self.model, batch, max_len)

    def close(self) -> None:
        """Nothing to release: the model lives in this process and is freed with the engine. Present
        because every :class:`~tether.engine.base.Engine` has it (the loops call it at the end)."""

    def _stop_sequences(self, params: SamplingParams) -> list[Tensor]:
        if not params.stop:
            return []
        if self.encode is None:
            raise ValueError("TorchEngine: SamplingParams.stop needs the engine to be built with encode=")
        return [torch.tensor(self.encode(s), dtype=torch.long, device=self.device) for s in params.stop]

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *, seed: int,
                 group_B: Tensor | None = None, n: int = 1) -> Rollout:
        """Sample ``n`` completions per prompt (rows ordered prompt-major). Returns a right-padded
        :class:`Rollout`; ``group_B`` defaults to the prompt index."""
        if n < 1:
            raise ValueError(f"TorchEngine.generate: n must be >= 1, got {n}")
        prompts = [list(p) for p in prompts for _ in range(n)]
        B = len(prompts)
        if B == 0:
            raise ValueError("TorchEngine.generate: no prompts")
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"TorchEngine.generate: prompt {i // n} is empty")
        lens = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        P, N = int(lens.max()), params.max_new_tokens
        limit = self.max_len
        if limit is not None and P + N > limit:
            raise ValueError(f"TorchEngine.generate: longest prompt ({P}) + max_new_tokens ({N}) exceeds the "
                             f"model's maximum length {limit}")
        if group_B is None:
            group_B = torch.arange(B // n).repeat_interleave(n)
        elif len(group_B) != B:
            raise ValueError(f"TorchEngine.generate: group_B has {len(group_B)} entries for {B} rows")
        dev = self.device
        # left-pad prompts for the batched prefill
        tokens_BP = torch.full((B, P), self.pad_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens_BP[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        valid_BP = torch.arange(P)[None, :] >= (P - lens)[:, None]
        positions_BP = (valid_BP.cumsum(-1) - 1).clamp(min=0)
        tokens_BP, valid_BP, positions_BP, lens = (x.to(dev) for x in (tokens_BP, valid_BP, positions_BP, lens))

        raw = self._sample(tokens_BP, valid_BP, positions_BP, lens, params, seed)
        with torch.no_grad():  # plain tensors (not inference tensors): the trainer differentiates through them
            raw = [None if x is None else x.clone(memory_format=torch.contiguous_format) for x in raw]
        return self._assemble(prompts, *raw, params, group_B)

    @torch.inference_mode()
    def _sample(self, tokens_BP, valid_BP, positions_BP, lens, params: SamplingParams, seed: int):
        """The decode loop. Every row samples at every step (a finished row's extra tokens are cut
        off afterwards from its recorded stop step), so a step costs no masking ops; each row's
        noise and tokens are the same as if finished rows were frozen. Outputs are written in place
        into step-major buffers (``[N, B]``, one contiguous row per step)."""
        B, P = tokens_BP.shape
        N, dev, V = params.max_new_tokens, self.device, self.vocab_size
        stops = self._stop_sequences(params)
        gen = torch.Generator(device=dev).manual_seed(int(seed))
        stepper = self._stepper(B, P + N)
        tok_NB = torch.full((N, B), self.pad_id, dtype=torch.long, device=dev)
        logp_NB = torch.zeros(N, B, dtype=torch.float32, device=dev)
        kept_NB = torch.full((N, B), V, dtype=torch.long, device=dev) if params.truncates else None
        stop_NB = torch.zeros(N, B, dtype=torch.bool, device=dev)  # row b stopped at step t
        done_B = torch.zeros(B, dtype=torch.bool, device=dev)
        positions_NB = lens[None, :] + torch.arange(N, device=dev)[:, None]
        noise_BV = torch.empty(B, V, dtype=torch.float32, device=dev)
        temperature, top_k, top_p = params.temperature, params.top_k, params.top_p
        eos_t = torch.tensor(self.eos_ids, dtype=torch.long, device=dev) if len(self.eos_ids) > 1 else None

        logits_BV = stepper.prefill(tokens_BP, valid_BP, positions_BP)
        steps = N
        for t in range(N):
            logp_BV, kept_B = sampling_logprobs(logits_BV.float(), temperature, top_k, top_p)
            tok_B = sample_from_logprobs(logp_BV, gen, noise_BV=noise_BV, out_B=tok_NB[t])
            torch.gather(logp_BV, 1, tok_B[:, None], out=logp_NB[t, :, None])
            if kept_NB is not None:
                kept_NB[t] = kept_B
            if eos_t is None:
                stop_B = torch.eq(tok_B, self.eos_id, out=stop_NB[t])
            else:
                stop_B = stop_NB[t]
                stop_B.copy_(torch.isin(tok_B, eos_t))
            for s in stops:
                L = len(s)
                if L <= t + 1:
                    stop_B |= (tok_NB[t + 1 - L:t + 1] == s[:, None]).all(0)
            done_B |= stop_B
            if t == N - 1 or bool(done_B.all()):
                steps = t + 1
                break
            logits_BV = stepper.step(tok_B, positions_NB[t])

        # completion length: up to and including the first stop step, else every step taken
        stop_NB = stop_NB[:steps]
        first_B = torch.where(done_B, stop_NB.float().argmax(0), steps - 1)
        comp_len_B = first_B + 1
        kept_BN = kept_NB.t() if kept_NB is not None else None
        return lens, tok_NB.t(), logp_NB.t(), kept_BN, comp_len_B, done_B

    def _assemble(self, prompts, lens_B, tok_BN, logp_BN, kept_BN, comp_len_B, done_B, params, group_B) -> Rollout:
        """Right-padded record: row b = prompt_b, completion_b[:comp_len_b], padding."""
        B, N = tok_BN.shape
        dev = tok_BN.device
        T = int((lens_B + comp_len_B).max())
        tokens_BT = torch.full((B, T), self.pad_id, dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):
            tokens_BT[i, :len(p)] = torch.tensor(p, dtype=torch.long, device=dev)
        cols_BN = lens_B[:, None] + torch.arange(N, device=dev)[None, :]
        in_comp_BN = torch.arange(N, device=dev)[None, :] < comp_len_B[:, None]
        cols_BN = torch.where(in_comp_BN, cols_BN, T)  # dump column for the unused tail
        pad = torch.zeros(B, 1, dtype=torch.long, device=dev)
        tokens_BT = torch.cat([tokens_BT, pad + self.pad_id], 1).scatter_(1, cols_BN, tok_BN)[:, :T]
        logp_BT = torch.zeros(B, T + 1, dtype=torch.float32, device=dev).scatter_(1, cols_BN, logp_BN)[:, :T]
        kept_BT = None
        if kept_BN is not None:
            kept_BT = torch.full((B, T + 1), self.vocab_size, dtype=torch.long, device=dev)
            kept_BT = kept_BT.scatter_(1, cols_BN, kept_BN)[:, :T]
        if not params.truncates:
            kept_BT = None
        rollout = Rollout(tokens_BT=tokens_BT, prompt_len_B=lens_B.clone(), completion_len_B=comp_len_B,
                          logp_mu_BT=logp_BT, version_BT=torch.zeros_like(tokens_BT), kept_count_BT=kept_BT,
                          sampling=params, group_B=group_B.to(dev), finished_B=done_B)
        rollout.version_BT = torch.where(rollout.loss_mask_BT, self.version, -1)
        return rollout
