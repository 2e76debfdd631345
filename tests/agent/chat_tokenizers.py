"""Small Hugging Face tokenizers with chat templates, built in-process (no download) for the agent tests.

* ``char_chat``: tether's character vocabulary (``CharTokenizer.save_hf``) with a bracket-role template whose
  assistant turns end in ``<eos>`` then a newline (the "<|im_end|>\\n" shape).
* ``bpe_chatml``: a byte-level BPE trained on a few lines, with ChatML specials (``<|im_start|>``,
  ``<|im_end|>``) and a Qwen / SmolLM-like template; merges make token boundaries depend on context.
* ``THINK_STRIP``: a template that drops ``<think>...</think>`` from every assistant message but the last
  (what Qwen3's template does to past turns): not append-only once an action thinks.
"""

from __future__ import annotations

import pytest

BRACKETS = ("{% for m in messages %}[{{ m['role'] }}]\n{{ m['content'] }}<eos>\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant]\n{% endif %}")
NO_TOOL = ("{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool role') }}{% endif %}"
           "[{{ m['role'] }}]\n{{ m['content'] }}<eos>\n{% endfor %}"
           "{% if add_generation_prompt %}[assistant]\n{% endif %}")
NO_CLOSE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
THINK_STRIP = ("{% for m in messages %}{% set c = m['content'] %}"
               "{% if m['role'] == 'assistant' and not loop.last and '</think>' in c %}"
               "{% set c = c.split('</think>')[-1] %}{% endif %}"
               "[{{ m['role'] }}]\n{{ c }}<eos>\n{% endfor %}"
               "{% if add_generation_prompt %}[assistant]\n{% endif %}")


def char_chat(tmp_path, template: str = BRACKETS):
    transformers = pytest.importorskip("transformers")
    from tether.models.tokenizer import CharTokenizer

    CharTokenizer().save_hf(tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    tok.chat_template = template
    return tok


def bpe_chatml():
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = ["say the letter a then b", "the answer is 42", "move left right up down", "tool: 3 + 4 = 7",
              "user assistant hello world", "<think>let me think</think> ok"] * 4
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(corpus, trainer)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    return tok
