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


def _rope_permute(w, n_heads: int):
    """llama.cpp stores q/k rows interleaved per rotary pair (its HF converter's permutation); the
    GGUF loader undoes it, so a writer must apply it."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(folder: Path, out: Path) -> Path:
    """Write the tiny Llama in ``folder`` as an unquantised (F32) GGUF file, the way llama.cpp lays it
    out: llama metadata, a byte-level BPE ("gpt2") tokenizer over the character vocabulary (no
    merges: every token is one character), ``blk.N.*`` tensors, tied output head."""
    gguf = pytest.importorskip("gguf")
    transformers = pytest.importorskip("transformers")

    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder))
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    cfg = model.config
    byte_level = {" ": "Ġ", "\n": "Ċ", "\t": "ĉ"}  # GPT-2's printable stand-ins for these bytes
    tokens = [byte_level.get(t, t) for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    # a byte-level vocabulary's end token is "<|endoftext|>" (the reader adds one if it is missing)
    tokens[cfg.eos_token_id] = "<|endoftext|>"
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<") and t.endswith(">") else 1 for t in tokens])  # 3: control
    w.add_token_scores([0.0] * len(tokens))  # no merges to list: the reader derives none from these
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_pad_token_id(cfg.pad_token_id)
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    names = {"input_layernorm": "attn_norm", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for hf_name, gg_name in names.items():
            w.add_tensor(f"blk.{i}.{gg_name}.weight", sd[f"{p}{hf_name}.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _rope_permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", _rope_permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
