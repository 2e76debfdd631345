"""A tiny llama-style causal LM in plain torch, numerically identical to ``transformers``' Llama.

Architecture (Touvron et al. 2023, "LLaMA"): token embedding -> ``n_layers`` x [RMSNorm ->
multi-head causal self-attention with rotary position embeddings (RoPE, Su et al. 2021) ->
residual; RMSNorm -> SwiGLU MLP ``down(silu(gate(x)) * up(x))`` (Shazeer 2020) -> residual] ->
RMSNorm -> linear head (optionally tied to the embedding).

The module tree uses the Hugging Face Llama parameter names (``model.layers.0.self_attn.q_proj.weight``
...), so ``state_dict()`` is a valid ``LlamaForCausalLM`` checkpoint and :func:`save_hf` only has to
write the config next to it.

Incremental decoding uses a preallocated :class:`KVCache`; left-padded prompts are handled by
explicit ``positions_BT`` and a key-validity mask (padding never attends to real tokens and vice versa).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class TinyConfig:
    vocab_size: int = 99
    """Number of token ids (the character tokenizer has 99)."""
    d_model: int = 192
    """Hidden size."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention heads; ``d_model`` must be divisible by it."""
    d_ff: int = 512
    """Inner size of the SwiGLU MLP."""
    max_len: int = 256
    """Longest sequence (prompt + completion) the model accepts."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = True
    """Share the input embedding and the output head."""
    init_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_len"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TinyConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"TinyConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"TinyConfig: head size d_model/n_heads = {self.d_model // self.n_heads} must be even (RoPE)")
        if not self.rope_theta > 0:
            raise ValueError(f"TinyConfig.rope_theta must be > 0, got {self.rope_theta}")
        if not self.norm_eps > 0:
            raise ValueError(f"TinyConfig.norm_eps must be > 0, got {self.norm_eps}")
        if not self.init_std > 0:
            raise ValueError(f"TinyConfig.init_std must be > 0, got {self.init_std}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)


class KVCache:
    """Preallocated keys/values ``[layers, B, heads, max_len, head_dim]`` plus a key-validity mask."""

    def __init__(self, cfg: TinyConfig, batch: int, max_len: int, *, dtype: torch.dtype, device=None) -> None:
        if max_len > cfg.max_len:
            raise ValueError(f"KVCache: max_len {max_len} exceeds TinyConfig.max_len {cfg.max_len}")
        shape = (cfg.n_layers, batch, cfg.n_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid_BS = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0
        self.max_len = max_len
        self.has_padding = False


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        if dtype == torch.float32:  # same maths as below without the no-op casts (fewer ops per decode step)
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


def _decode_norm(norm: RMSNorm, x: Tensor) -> Tensor:
    """``norm(x)``; in float32 as one fused kernel (``F.rms_norm``: the same maths, bitwise equal here)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)
    return norm(x)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x_BTD: Tensor, cos_BTK: Tensor, sin_BTK: Tensor, mask_BTS: Tensor | None,
                cache: KVCache | None, layer: int) -> Tensor:
        B, T, _ = x_BTD.shape
        H, K = self.n_heads, self.head_dim
        fused = getattr(self, "qkv_weight", None)
        if fused is not None and not torch.is_grad_enabled() and fused.data_ptr() == self.q_proj.weight.data_ptr():
            qkv = F.linear(x_BTD, fused).view(B, T, 3, H, K)
            qk, v = qkv[:, :, :2], qkv[:, :, 2].transpose(1, 2)
            qk = qk * cos_BTK[:, :, None, None] + _rotate_half(qk) * sin_BTK[:, :, None, None]
            q, k = qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2)
        else:
            q = self.q_proj(x_BTD).view(B, T, H, K).transpose(1, 2)
            k = self.k_proj(x_BTD).view(B, T, H, K).transpose(1, 2)
            v = self.v_proj(x_BTD).view(B, T, H, K).transpose(1, 2)
            cos, sin = cos_BTK[:, None], sin_BTK[:, None]
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        if cache is not None:
            start = cache.length
            cache.k[layer, :, :, start:start + T] = k
            cache.v[layer, :, :, start:start + T] = v
            k = cache.k[layer, :, :, :start + T]
            v = cache.v[layer, :, :, :start + T]
        if mask_BTS is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_BTS[:, None])
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        fused = getattr(self, "gate_up_weight", None)
        if fused is not None and not torch.is_grad_enabled() and fused.data_ptr() == self.gate_proj.weight.data_ptr():
            gate, up = F.linear(x, fused).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)


class TinyLM(nn.Module):
    """Llama-style causal LM. ``forward(tokens_BT) -> logits_BTV`` (float32 logits)."""

    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim))
        freqs = torch.arange(cfg.max_len).float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("rope_cos", emb.cos(), persistent=False)
        self.register_buffer("rope_sin", emb.sin(), persistent=False)
        # decode tables: [max_len, 2, head_dim] = (cos, sin with its first half negated), so that
        # rotate_half(x) * sin == roll(x, head_dim / 2) * signed_sin (one gather, no cat/neg per step)
        half = cfg.head_dim // 2
        signed_sin = torch.cat((-emb.sin()[:, :half], emb.sin()[:, half:]), dim=-1)
        self.register_buffer("rope_cs", torch.stack((emb.cos(), signed_sin), dim=1), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.init_std
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, 0.0, std)
        # scale residual outputs down with depth (GPT-2 style) so the tiny model starts stable
        for block in self.model.layers:
            block.self_attn.o_proj.weight.data.mul_(1 / math.sqrt(2 * self.config.n_layers))
            block.mlp.down_proj.weight.data.mul_(1 / math.sqrt(2 * self.config.n_layers))

    @torch.no_grad()
    def fuse_projections_(self) -> TinyLM:
        """For inference: store q/k/v (and gate/up) weights in one tensor each, re-pointing the
        parameters at views of it, so one matmul replaces three (two) when gradients are off.
        Parameter names, shapes and ``state_dict`` are unchanged and in-place updates
        (``load_state_dict``, ``copy_``, optimiser steps) reach the fused tensor; with gradients on,
        or when the sharing is lost (``copy.deepcopy``), the unfused path runs."""
        for block in self.model.layers:
            a, m = block.self_attn, block.mlp
            fused = getattr(a, "qkv_weight", None)
            if fused is not None and fused.data_ptr() == a.q_proj.weight.data_ptr():
                continue  # already fused (a deep copy loses the sharing: then fuse again)
            a.qkv_weight = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
            d = a.q_proj.weight.shape[0]
            a.q_proj.weight.data, a.k_proj.weight.data, a.v_proj.weight.data = a.qkv_weight.split(d)
            m.gate_up_weight = torch.cat([m.gate_proj.weight, m.up_proj.weight])
            f = m.gate_proj.weight.shape[0]
            m.gate_proj.weight.data, m.up_proj.weight.data = m.gate_up_weight.split(f)
        return self

    def is_fused(self) -> bool:
        """True when every block's fused projection weights still share storage with its parameters."""
        for block in self.model.layers:
            a, m = block.self_attn, block.mlp
            qkv, gu = getattr(a, "qkv_weight", None), getattr(m, "gate_up_weight", None)
            if qkv is None or gu is None or qkv.data_ptr() != a.q_proj.weight.data_ptr() \
                    or gu.data_ptr() != m.gate_proj.weight.data_ptr():
                return False
        return True

    def decode_step(self, tokens_B: Tensor, positions_B: Tensor, cache: KVCache) -> Tensor:
        """One new token per row appended to ``cache``: logits ``[B, V]`` (float32).

        The inference-only twin of ``forward(tokens_B[:, None], positions_BT=positions_B[:, None],
        cache=cache)[:, 0]`` (same maths, equal up to float rounding, tested) written for the
        per-token cost of batched decoding: needs :meth:`fuse_projections_` and gradients off; about
        14 kernels per block instead of ~30 (fused RMSNorm, RoPE as roll + addcmul from one gathered
        table, residual adds folded into ``addmm``, the attention mask a view of the cache's key
        validity).
        """
        B = tokens_B.shape[0]
        start = cache.length
        if start + 1 > cache.max_len:
            raise ValueError(f"TinyLM: cache holds {cache.max_len} positions, needs {start + 1}")
        cfg = self.config
        H, K, D = cfg.n_heads, cfg.head_dim, cfg.d_model
        cs = self.rope_cs[positions_B]  # [B, 2, K]
        if cs.dtype != self.model.embed_tokens.weight.dtype:
            cs = cs.to(self.model.embed_tokens.weight.dtype)
        cos, sin = cs[:, None, 0:1], cs[:, None, 1:2]  # [B, 1, 1, K], broadcast over (q|k, heads)
        mask = None
        if cache.has_padding:
            cache.valid_BS[:, start] = True
            mask = cache.valid_BS[:, None, None, :start + 1]
        x = F.embedding(tokens_B, self.model.embed_tokens.weight)  # [B, D]
        for i, block in enumerate(self.model.layers):
            a, m = block.self_attn, block.mlp
            ln1, ln2 = block.input_layernorm, block.post_attention_layernorm
            qkv = F.linear(_decode_norm(ln1, x), a.qkv_weight).view(B, 3, H, K)
            qk = qkv[:, :2]
            qk = torch.addcmul(qk * cos, qk.roll(K // 2, -1), sin)  # [B, 2, H, K]
            cache.k[i, :, :, start] = qk[:, 1]
            cache.v[i, :, :, start] = qkv[:, 2]
            k, v = cache.k[i, :, :, :start + 1], cache.v[i, :, :, :start + 1]
            out = F.scaled_dot_product_attention(qk[:, 0, :, None], k, v, attn_mask=mask)  # [B, H, 1, K]
            x = torch.addmm(x, out.reshape(B, D), a.o_proj.weight.t())
            gate_up = F.linear(_decode_norm(ln2, x), m.gate_up_weight)
            gate, up = gate_up.chunk(2, dim=-1)
            x = torch.addmm(x, F.silu(gate) * up, m.down_proj.weight.t())
        cache.length = start + 1
        return self.lm_head(_decode_norm(self.model.norm, x)).float()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        p = self.model.embed_tokens.weight
        return KVCache(self.config, batch, max_len or self.config.max_len, dtype=p.dtype, device=p.device)

    def forward(self, tokens_BT: Tensor, *, positions_BT: Tensor | None = None, key_valid_BT: Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False, keep_from: int = 0) -> Tensor:
        """Logits (float32) for every position, only the last one (``last_only``: shape ``[B, 1, V]``),
        or positions ``keep_from ..`` (``[B, T - keep_from, V]``; earlier positions skip the head).

        Without ``cache``: a plain causal forward over ``tokens_BT`` with positions ``0..T-1`` unless
        ``positions_BT`` is given; right padding needs no mask (pads come after the real tokens).
        With ``cache``: the tokens are appended at ``cache.length``; ``key_valid_BT`` marks which of
        the new tokens are real (left padding of prompts); queries see valid keys up to themselves,
        and every query also sees itself so padding rows stay finite.
        """
        B, T = tokens_BT.shape
        if positions_BT is None:
            start = 0 if cache is None else cache.length
            if start + T > self.config.max_len:
                raise ValueError(f"TinyLM: sequence length {start + T} exceeds max_len {self.config.max_len}")
            positions_BT = torch.arange(start, start + T, device=tokens_BT.device).expand(B, T)
        cos, sin = self.rope_cos[positions_BT], self.rope_sin[positions_BT]
        x = self.model.embed_tokens(tokens_BT)
        if x.dtype != cos.dtype:
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        mask = None
        if cache is not None:
            start = cache.length
            if start + T > cache.max_len:
                raise ValueError(f"TinyLM: cache holds {cache.max_len} positions, needs {start + T}")
            cache.valid_BS[:, start:start + T] = True if key_valid_BT is None else key_valid_BT
            if key_valid_BT is not None and not bool(key_valid_BT.all()):
                cache.has_padding = True
            S = start + T
            if T == 1:
                if not cache.has_padding:
                    mask = None
                else:
                    mask = cache.valid_BS[:, None, :S].clone()
                    mask[:, :, start] = True
            else:
                q_pos = torch.arange(start, S, device=x.device)
                k_pos = torch.arange(S, device=x.device)
                causal = k_pos[None, :] <= q_pos[:, None]
                mask = (causal[None] & cache.valid_BS[:, None, :S]) | (k_pos[None, :] == q_pos[:, None])[None]
        elif key_valid_BT is not None:
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            mask = (causal[None] & key_valid_BT[:, None, :]) | torch.eye(T, dtype=torch.bool, device=x.device)[None]
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.length += T
        if last_only:
            x = x[:, -1:]
        elif keep_from:
            x = x[:, keep_from:]
        return self.lm_head(self.model.norm(x)).float()


def hf_config_dict(cfg: TinyConfig, *, bos_id: int | None = None, eos_id: int | None = None,
                   pad_id: int | None = None) -> dict:
    """The ``config.json`` of the equivalent ``LlamaForCausalLM``."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id,
        "torch_dtype": "float32", "dtype": "float32", "use_cache": True,
    }


def save_hf(model: TinyLM, tokenizer, directory: str | Path) -> Path:
    """Write ``model`` as a Hugging Face ``LlamaForCausalLM`` folder: ``config.json``,
    ``model.safetensors`` (Llama key names), ``generation_config.json``, the tokenizer vocabulary
    and, when ``transformers`` is installed, an ``AutoTokenizer``-loadable tokenizer with the same ids.

    Needs ``safetensors`` (the ``hf`` extra).
    """
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    ids = {"bos_id": getattr(tokenizer, "bos_id", None), "eos_id": getattr(tokenizer, "eos_id", None),
           "pad_id": getattr(tokenizer, "pad_id", None)}
    (out / "config.json").write_text(json.dumps(hf_config_dict(cfg, **ids), indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": ids["bos_id"], "eos_token_id": ids["eos_id"], "pad_token_id": ids["pad_id"]}, indent=2))
    state = {k: v.detach().float().contiguous().clone() for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "tether_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    if hasattr(tokenizer, "save"):
        tokenizer.save(out)
    if hasattr(tokenizer, "save_hf"):
        try:
            tokenizer.save_hf(out)
        except ImportError:  # transformers / tokenizers missing: weights and config are still usable
            pass
    return out
