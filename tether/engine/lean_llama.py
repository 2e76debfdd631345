"""A lean decode path for Hugging Face Llama-layout decoders (Llama, SmolLM2, Qwen2, Qwen3, Mistral).

The stock ``transformers`` forward costs thousands of small ops per decode step (a ``DynamicCache``
that concatenates, a mask rebuilt from a growing ``attention_mask``, generic attention dispatch).
For models whose layers are exactly

    h = h + o_proj(attn(rope(q), rope(k), v)),  q, k, v = qkv_proj(rmsnorm_1(h))
    h = h + down_proj(silu(gate) * up),          gate, up = gate_up_proj(rmsnorm_2(h))
    logits = lm_head(rmsnorm_f(h))

:class:`LeanWeights` reads the weights once into a fused layout (``[W_q; W_k; W_v]`` and
``[W_gate; W_up]`` concatenated by output rows, so each is one matmul; biases likewise, zeros where a
projection has none, e.g. Qwen2's ``o_proj``; Qwen3's per-head q/k RMSNorms applied to q and k
before RoPE, their weights stacked per head) in the model's own dtype (bf16 when the engine runs in
bf16), and :class:`LeanStepper` runs prefill and one-token steps over a preallocated KV cache
``[layers, B, H_kv, L, D]`` written in place. The maths is the stock forward's, op for op where the
rounding matters:

* RMSNorm ``w * (x / sqrt(mean(x^2) + eps))`` computed in float32 and cast back before the weight;
* RoPE from one table ``cos[p] = cos(p * inv_freq) * s``, ``sin[p]`` likewise, built from the model's
  own ``rotary_emb.inv_freq`` and ``attention_scaling`` (so ``rope_theta`` and the static
  ``rope_scaling`` types ``linear``, ``llama3``, ``yarn`` are the model's), in float32, cast to the
  model dtype; ``rope(x) = x cos + rotate_half(x) sin``;
* attention ``softmax(q k^T / sqrt(D) + mask) v`` with grouped-query heads: query head ``h`` reads
  key/value head ``h // G`` (``G = H / H_kv``, as ``repeat_kv``). At ``q_len = 1`` it is two batched
  matmuls over ``[B, H_kv, G, D] x [B, H_kv, D, S]`` (no key/value repetition, softmax in float32);
  the prefill uses ``scaled_dot_product_attention``.

Left padding is the engine's: prompt row ``b`` occupies the last ``len_b`` of ``P`` slots, pads get
position 0, no query attends a pad key (a pad query attends itself only, so its values stay finite;
nothing reads them). Cache slot ``P + t`` holds step ``t`` for every row.

:func:`unsupported_reason` says why a model cannot take this path (the engine then uses the stock
forward and logs the reason): another architecture, non-``Linear`` projections (LoRA adapters), an
activation other than SiLU, a RoPE type whose frequencies depend on the sequence length (``dynamic``,
``longrope``), a sliding window shorter than the call's length, or an active autocast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

SUPPORTED = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")
"""Architectures (exact class names) whose decoder layers have the Llama layout above."""
STATIC_ROPE = ("default", "linear", "llama3", "yarn")
"""RoPE types whose inverse frequencies and scaling do not depend on the sequence length."""


def _is_linear(m) -> bool:
    return type(m) is torch.nn.Linear


def structural_reason(model) -> str | None:
    """Why ``model``'s structure rules out the lean path (None: it fits). Static: checked once."""
    name = type(model).__name__
    if name not in SUPPORTED:
        return f"{name} is not one of the supported architectures ({', '.join(SUPPORTED)})"
    cfg = model.config
    act = getattr(cfg, "hidden_act", None)
    if act != "silu":
        return f"hidden_act {act!r} (the lean path implements silu)"
    rope = getattr(model.model, "rotary_emb", None)
    rope_type = getattr(rope, "rope_type", None)
    if rope_type not in STATIC_ROPE:
        return f"rope type {rope_type!r} (the lean path supports {', '.join(STATIC_ROPE)})"
    if not (isinstance(model.model.embed_tokens, torch.nn.Embedding) and _is_linear(model.lm_head)):
        return "the embedding or the output head is not a plain Embedding / Linear"
    for i, layer in enumerate(model.model.layers):
        a, m = layer.self_attn, layer.mlp
        mods = {"q_proj": a.q_proj, "k_proj": a.k_proj, "v_proj": a.v_proj, "o_proj": a.o_proj,
                "gate_proj": m.gate_proj, "up_proj": m.up_proj, "down_proj": m.down_proj}
        for key, mod in mods.items():
            if not _is_linear(mod):
                return f"layer {i} {key} is a {type(mod).__name__}, not a plain Linear (e.g. a LoRA adapter)"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm, *_qk_norms(a)):
            if not hasattr(norm, "variance_epsilon"):
                return f"layer {i} has a {type(norm).__name__} norm, not an RMSNorm"
    return None


def _qk_norms(attn) -> tuple:
    """Qwen3's per-head RMSNorms of q and k (before RoPE); () for the other architectures."""
    return (attn.q_norm, attn.k_norm) if hasattr(attn, "q_norm") else ()


def _sliding_window(model, layer) -> int | None:
    attn = layer.self_attn
    if hasattr(attn, "sliding_window"):  # Qwen2: per layer (None on full-attention layers)
        return attn.sliding_window
    return getattr(model.config, "sliding_window", None)  # Mistral: one for all layers


def call_reason(model, max_len: int) -> str | None:
    """Why one ``generate`` call of total length ``max_len`` (prompt + new tokens) cannot take the
    lean path although the structure fits: a sliding window that would bind, or an active autocast."""
    for i, layer in enumerate(model.model.layers):
        w = _sliding_window(model, layer)
        if w is not None and max_len > w:
            return f"layer {i} has a sliding window of {w} tokens, shorter than this call's {max_len}"
    if torch.is_autocast_enabled("cpu") or (torch.cuda.is_available() and torch.is_autocast_enabled("cuda")):
        return "autocast is active (the lean path runs in the weights' own dtype)"
    return None


def unsupported_reason(model, max_len: int) -> str | None:
    """Why ``model`` cannot decode a call of length ``max_len`` on the lean path; None if it can."""
    return structural_reason(model) or call_reason(model, max_len)


def fingerprint(model) -> tuple:
    """Identity and in-place version counter of every parameter: it changes whenever a weight is
    replaced or written in place (``load_weights``' ``copy_``, an optimiser step on shared weights,
    int8 fake quantisation), so a stale fused copy is detected without comparing values."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


def _cat_bias(mods, dtype, device) -> Tensor | None:
    if all(m.bias is None for m in mods):
        return None
    return torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features, dtype=dtype, device=device)
                      for m in mods])


@dataclass
class _Layer:
    norm1: Tensor
    eps1: float
    qkv_w: Tensor
    qkv_b: Tensor | None
    o_w: Tensor
    o_b: Tensor | None
    norm2: Tensor
    eps2: float
    gu_w: Tensor
    gu_b: Tensor | None
    down_w: Tensor
    down_b: Tensor | None
    qk_norm: Tensor | None = None  # [H + H_kv, D]: q_norm's weight for each query head, then k_norm's
    eps_qk: float = 0.0


class LeanWeights:
    """The model's weights in the fused layout (module docstring), built once per weight version.

    Norms, ``o_proj``, ``down_proj``, the embedding and the head are the model's own tensors (no
    copy); only the q/k/v and gate/up concatenations are new memory. :meth:`stale` says whether the
    model's parameters changed since the build.
    """

    @torch.no_grad()
    def __init__(self, model) -> None:
        cfg = model.config
        inner = model.model
        first = inner.layers[0].self_attn
        self.dtype = inner.embed_tokens.weight.dtype
        self.device = inner.embed_tokens.weight.device
        self.head_dim = int(first.head_dim)
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(cfg.num_key_value_heads)
        self.scale = float(first.scaling)
        self.intermediate = int(inner.layers[0].mlp.gate_proj.out_features)
        self.embed = inner.embed_tokens.weight
        self.norm_f = inner.norm.weight
        self.eps_f = float(inner.norm.variance_epsilon)
        self.head_w = model.lm_head.weight
        self.head_b = model.lm_head.bias
        rope = inner.rotary_emb
        self.inv_freq = rope.inv_freq.detach().to(torch.float32).clone()
        self.rope_scaling = float(rope.attention_scaling)
        self.layers = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            qkv = (a.q_proj, a.k_proj, a.v_proj)
            qk_norm, eps_qk = None, 0.0
            if _qk_norms(a):
                if a.q_norm.variance_epsilon != a.k_norm.variance_epsilon:
                    raise ValueError("LeanWeights: q_norm and k_norm have different eps")
                qk_norm = torch.cat([a.q_norm.weight.expand(self.n_heads, self.head_dim),
                                     a.k_norm.weight.expand(self.n_kv, self.head_dim)])
                eps_qk = float(a.q_norm.variance_epsilon)
            self.layers.append(_Layer(
                norm1=layer.input_layernorm.weight, eps1=float(layer.input_layernorm.variance_epsilon),
                qkv_w=torch.cat([p.weight for p in qkv]), qkv_b=_cat_bias(qkv, self.dtype, self.device),
                o_w=a.o_proj.weight, o_b=a.o_proj.bias,
                norm2=layer.post_attention_layernorm.weight,
                eps2=float(layer.post_attention_layernorm.variance_epsilon),
                gu_w=torch.cat([m.gate_proj.weight, m.up_proj.weight]),
                gu_b=_cat_bias((m.gate_proj, m.up_proj), self.dtype, self.device),
                down_w=m.down_proj.weight, down_b=m.down_proj.bias, qk_norm=qk_norm, eps_qk=eps_qk))
        self._fingerprint = fingerprint(model)
        self._cos = self._sin = None

    def stale(self, model) -> bool:
        return fingerprint(model) != self._fingerprint

    def rope_table(self, length: int) -> tuple[Tensor, Tensor]:
        """``(cos_LD, sin_signed_LD)`` for positions ``0 .. length-1`` (grown by doubling, kept).
        ``sin_signed = [-sin_half, sin_half]`` so that ``rotate_half(x) * sin == swap_halves(x) * sin_signed``
        exactly (negation is exact)."""
        if self._cos is None or self._cos.shape[0] < length:
            n = max(length, 2 * (0 if self._cos is None else self._cos.shape[0]), 64)
            pos = torch.arange(n, dtype=torch.float32, device=self.device)
            freqs = pos[:, None] * self.inv_freq.to(self.device)[None, :]  # as the stock p.float() * inv_freq
            emb = torch.cat([freqs, freqs], dim=-1)
            cos = emb.cos() * self.rope_scaling
            sin = emb.sin() * self.rope_scaling
            half = self.head_dim // 2
            sin_signed = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
            self._cos, self._sin = cos.to(self.dtype), sin_signed.to(self.dtype)
        return self._cos, self._sin


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``weight * (x / sqrt(mean(x^2) + eps))``, the mean and scaling in float32, cast back to
    ``x``'s dtype before the weight (the stock ``LlamaRMSNorm`` rounding)."""
    xf = x if x.dtype == torch.float32 else x.float()  # (a same-dtype cast still costs a dispatch)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (xf if x.dtype == torch.float32 else xf.to(x.dtype))


def apply_rope(x_xD: Tensor, cos_xD: Tensor, sin_signed_xD: Tensor) -> Tensor:
    """``x cos + rotate_half(x) sin`` with ``rotate_half(x) = [-x_2, x_1]``, written as
    ``x cos + [x_2, x_1] sin_signed``."""
    half = x_xD.shape[-1] // 2
    swapped = torch.cat([x_xD.narrow(-1, half, half), x_xD.narrow(-1, 0, half)], dim=-1)
    return x_xD * cos_xD + swapped * sin_signed_xD


class LeanStepper:
    """Prefill + one-token steps (the engine's stepper interface) over :class:`LeanWeights`.

    ``prefill(tokens_BP, valid_BP, positions_BP)`` and ``step(tokens_B, positions_B)`` return the
    float32 logits of the last position, ``[B, V]``.
    """

    def __init__(self, weights: LeanWeights, batch: int, max_len: int) -> None:
        w = weights
        self.w = w
        self.max_len = int(max_len)
        n_layers = len(w.layers)
        shape = (n_layers, batch, w.n_kv, self.max_len, w.head_dim)
        # every slot read is written first (prompt slots by the prefill, slot P + t by step t)
        self.k = torch.empty(shape, dtype=w.dtype, device=w.device)
        self.v = torch.empty(shape, dtype=w.dtype, device=w.device)
        self.cos, self.sin = w.rope_table(self.max_len)
        self.bias_BL = torch.zeros(batch, self.max_len, dtype=torch.float32, device=w.device)
        self.filled = 0
        self.fp32 = w.dtype == torch.float32

    def _qkv(self, layer: _Layer, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x [..., C]`` -> ``(qk [..., H + H_kv, D], v [..., H_kv, D])``, q and k heads side by side
        (rotated together, not yet rotated here)."""
        w = self.w
        qkv = F.linear(x, layer.qkv_w, layer.qkv_b).unflatten(-1, (w.n_heads + 2 * w.n_kv, w.head_dim))
        n = w.n_heads + w.n_kv
        qk = qkv.narrow(-2, 0, n)
        if layer.qk_norm is not None:  # per head, over D: the same maths as q_norm and k_norm apart
            qk = rms_norm(qk, layer.qk_norm, layer.eps_qk)
        return qk, qkv.narrow(-2, n, w.n_kv)

    def _mlp(self, layer: _Layer, h: Tensor) -> Tensor:
        x = rms_norm(h, layer.norm2, layer.eps2)
        gu = F.linear(x, layer.gu_w, layer.gu_b)
        i = self.w.intermediate
        return h + F.linear(F.silu(gu.narrow(-1, 0, i)) * gu.narrow(-1, i, i), layer.down_w, layer.down_b)

    def _logits(self, h_BC: Tensor) -> Tensor:
        w = self.w
        logits = F.linear(rms_norm(h_BC, w.norm_f, w.eps_f), w.head_w, w.head_b)
        return logits if self.fp32 else logits.float()

    @torch.no_grad()
    def prefill(self, tokens_BP: Tensor, valid_BP: Tensor, positions_BP: Tensor) -> Tensor:
        w = self.w
        B, P = tokens_BP.shape
        H, K, D = w.n_heads, w.n_kv, w.head_dim
        cos, sin = self.cos[positions_BP][:, :, None], self.sin[positions_BP][:, :, None]  # [B, P, 1, D]
        causal_PP = torch.ones(P, P, dtype=torch.bool, device=w.device).tril()
        eye_PP = torch.eye(P, dtype=torch.bool, device=w.device)
        mask_B1PP = ((causal_PP[None] & valid_BP[:, None, :]) | eye_PP[None])[:, None]
        self.bias_BL[:, :P].masked_fill_(~valid_BP, float("-inf"))
        h = F.embedding(tokens_BP, w.embed)
        for li, layer in enumerate(w.layers):
            x = rms_norm(h, layer.norm1, layer.eps1)
            qk, v = self._qkv(layer, x)  # [B, P, H + K, D], [B, P, K, D]
            qk = apply_rope(qk, cos, sin)
            q = qk[:, :, :H].transpose(1, 2)
            k = qk[:, :, H:].transpose(1, 2)
            self.k[li, :, :, :P] = k
            self.v[li, :, :, :P] = v.transpose(1, 2)
            att = F.scaled_dot_product_attention(q, self.k[li, :, :, :P], self.v[li, :, :, :P], attn_mask=mask_B1PP,
                                                 scale=w.scale, enable_gqa=K != H)
            h = h + F.linear(att.transpose(1, 2).reshape(B, P, H * D), layer.o_w, layer.o_b)
            h = self._mlp(layer, h)
        self.filled = P
        return self._logits(h[:, -1])

    @torch.no_grad()
    def step(self, tokens_B: Tensor, positions_B: Tensor) -> Tensor:
        w = self.w
        B = tokens_B.shape[0]
        H, K, D = w.n_heads, w.n_kv, w.head_dim
        G = H // K
        s = self.filled
        if s >= self.max_len:
            raise RuntimeError(f"LeanStepper: the cache holds {self.max_len} positions, all used")
        S = s + 1
        cos, sin = self.cos[positions_B][:, None], self.sin[positions_B][:, None]  # [B, 1, D]
        bias = self.bias_BL[:, None, None, :S]  # [B, 1, 1, S]; slot s is the new token (never masked)
        # per-step views over all layers (one dispatch each, not one per layer)
        k_slot, v_slot = self.k.select(3, s), self.v.select(3, s)  # [layers, B, K, D]
        k_used, v_used = self.k.narrow(3, 0, S), self.v.narrow(3, 0, S)  # [layers, B, K, S, D]
        h = F.embedding(tokens_B, w.embed)
        for li, layer in enumerate(w.layers):
            x = rms_norm(h, layer.norm1, layer.eps1)
            qk, v = self._qkv(layer, x)  # [B, H + K, D], [B, K, D]
            qk = apply_rope(qk, cos, sin)
            k_slot[li].copy_(qk.narrow(1, H, K))
            v_slot[li].copy_(v)
            q = (qk.narrow(1, 0, H) * w.scale).view(B, K, G, D)
            scores = torch.matmul(q, k_used[li].transpose(-1, -2))  # [B, K, G, S]
            probs = torch.softmax((scores if self.fp32 else scores.float()) + bias, dim=-1)
            probs = probs if self.fp32 else probs.to(w.dtype)
            att = torch.matmul(probs, v_used[li])  # [B, K, G, D]
            h = h + F.linear(att.reshape(B, H * D), layer.o_w, layer.o_b)
            h = self._mlp(layer, h)
        self.filled = S
        return self._logits(h)

