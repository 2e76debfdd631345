"""Tiny models built in-process for engine tests (no downloads)."""

from __future__ import annotations

import torch

from tether.models.tiny import TinyConfig, TinyLM

VOCAB = 40
EOS, PAD = 2, 0


def tiny_builtin(seed: int = 0, **overrides) -> TinyLM:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=128, init_std=0.3)
    cfg.update(overrides)
    return TinyLM(TinyConfig(**cfg)).eval()


def tiny_hf(kind: str, seed: int = 0):
    transformers = __import__("pytest").importorskip("transformers")
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD)
    if kind == "llama":
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                       initializer_range=0.3, **common)
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                       initializer_range=0.3, **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif kind == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, initializer_range=0.3,
                                      **common)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        raise ValueError(kind)
    return model.float().eval()


def make_model(kind: str, seed: int = 0):
    return tiny_builtin(seed) if kind == "builtin" else tiny_hf(kind, seed)


def random_prompts(n: int, seed: int = 0, lo: int = 1, hi: int = 12) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(3, VOCAB, (L,), generator=g).tolist() for L in lens]
