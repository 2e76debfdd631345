"""A tiny Hugging Face Llama folder built in-process (character tokenizer, random weights)."""

from __future__ import annotations

from pathlib import Path

import pytest

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def tiny_llama_folder(path: Path, *, seed: int = 0, chat: bool = False, vocab_size: int | None = None) -> Path:
    transformers = pytest.importorskip("transformers")
    import torch

    from tether.models.tokenizer import CharTokenizer

    tok = CharTokenizer()
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size or tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1,
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(path))
    tok.save_hf(path)
    if chat:
        hf_tok = transformers.AutoTokenizer.from_pretrained(str(path))
        hf_tok.chat_template = CHAT_TEMPLATE
        hf_tok.save_pretrained(str(path))
    return path
