"""The text adapter: the token context it builds is the chat template's rendering of its messages, and the
sampled action tokens sit in it unchanged (never re-tokenised)."""

from __future__ import annotations

import random

import pytest

from tests.agent.chat_tokenizers import BRACKETS, NO_CLOSE, NO_TOOL, bpe_chatml, char_chat
from tether.agent.env import TextStep
from tether.agent.render import ChatRenderer, PlainRenderer, TextEnvAdapter
from tether.models.tokenizer import CharTokenizer
from tether.rollout import Source

pytestmark = pytest.mark.unit

WORDS = ("a", "b", "say", "the", "answer", "is", "42", "left", "up", "3 + 4", "=", "7", "\n", " ", "ok!")


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(WORDS) + rng.choice(("", " ")) for _ in range(rng.randint(1, n)))


class ScriptEnv:
    """A text environment that replies with the scripted texts and sources, then stops."""

    def __init__(self, first: str, replies: list[tuple[str, Source]]) -> None:
        self.first, self.replies = first, replies

    def reset(self, seed: int) -> str:
        self.k = 0
        return self.first

    def step(self, action: str) -> TextStep:
        self.k += 1
        if self.k > len(self.replies):
            return TextStep(None, 1.0, True, {})
        text, source = self.replies[self.k - 1]
        return TextStep(text, 0.0, False, {}, source=source)


def _episode(adapter: TextEnvAdapter, actions: list[list[int]]) -> tuple[list[int], list[tuple[int, int]]]:
    """What the episode runner does: the first observation, then each action and the reply, as tokens."""
    ctx = list(adapter.reset(0).tokens)
    spans = []
    for a in actions:
        spans.append((len(ctx), len(ctx) + len(a)))
        ctx += a
        out = adapter.step(list(a))
        if out.observation is not None:
            ctx += out.observation.tokens
    return ctx, spans


def _random_episode(rng: random.Random, encode, eos: int, turns: int):
    replies = [(_text(rng, 4), rng.choice((Source.ENV, Source.TOOL))) for _ in range(turns)]
    actions = [encode(_text(rng, 5)) + ([eos] if rng.random() < 0.75 else []) for _ in range(turns)]
    return ScriptEnv(_text(rng, 6), replies), actions


def _template(hf, messages) -> list[int]:
    out = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_plain_renderer_is_the_texts_own_tokens():
    tok = CharTokenizer()
    r = PlainRenderer(tok)
    assert r.first("go\n") == tok.encode("go\n")  # no BOS: how a single-turn prompt is encoded for this tokenizer
    assert r.reply("\nsay b\n", "tool") == tok.encode("\nsay b\n")
    assert r.action_text(tok.encode("ab") + [tok.eos_id]) == "ab" and r.action_text(tok.encode("ab")) == "ab"
    env = ScriptEnv("say a\n", [("\nsay b\n", Source.TOOL)])
    adapter = TextEnvAdapter(env, r)
    a0, a1 = tok.encode("a") + [tok.eos_id], tok.encode("bb")
    ctx, spans = _episode(adapter, [a0, a1])
    assert ctx == tok.encode("say a\n") + a0 + tok.encode("\nsay b\n") + a1
    assert [ctx[s:e] for s, e in spans] == [a0, a1]
    assert adapter.messages == [{"role": "user", "content": "say a\n"}, {"role": "assistant", "content": "a"},
                                {"role": "tool", "content": "\nsay b\n"}, {"role": "assistant", "content": "bb"}]


@pytest.mark.parametrize("build", ["char", "bpe"])
def test_chat_adapter_context_equals_template_over_random_conversations(build, tmp_path):
    hf = char_chat(tmp_path) if build == "char" else bpe_chatml()
    r = ChatRenderer(hf)
    eos = hf.eos_token_id
    rng = random.Random(0)
    for _ in range(40):
        env, actions = _random_episode(rng, lambda t: hf(t, add_special_tokens=False)["input_ids"], eos,
                                       rng.randint(1, 4))
        adapter = TextEnvAdapter(env, r)
        ctx = list(adapter.reset(0).tokens)
        assert ctx == _template(hf, adapter.messages)
        for a in actions:
            start = len(ctx)
            ctx += a
            out = adapter.step(list(a))
            if out.observation is None:
                break
            ctx += out.observation.tokens
            assert ctx[start:start + len(a)] == a  # the sampled tokens, unchanged
            assert ctx == _template(hf, adapter.messages), adapter.messages  # after k turns: the template's rendering
            assert out.observation.source in (Source.ENV, Source.TOOL)


def test_reply_starts_right_after_the_sampled_end_of_turn_token():
    hf = bpe_chatml()
    r = ChatRenderer(hf)
    im_end, im_start = hf.convert_tokens_to_ids("<|im_end|>"), hf.convert_tokens_to_ids("<|im_start|>")
    delta = r.reply("x", "user")
    assert delta[0] != im_end and hf.decode(delta[:2]) == "\n<|im_start|>"  # the "\n" after <|im_end|> is the reply's
    assert delta[1] == im_start and hf.decode(delta).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert r.reply("x", "user", closed=False) == [im_end] + delta  # a cut action: the reply closes the turn first
    assert r.closed([5, im_end]) and not r.closed([5, 6])
    assert r.action_text(hf("the answer", add_special_tokens=False)["input_ids"] + [im_end]) == "the answer"


def test_sampled_tokens_are_never_re_encoded():
    """A non-canonical sampling (one token per character where BPE merges) stays as sampled in the context;
    the re-rendered conversation is different (the drift the meter measures), the adapter's context is not."""
    hf = bpe_chatml()
    r = ChatRenderer(hf)
    text = "the answer"
    canonical = hf(text, add_special_tokens=False)["input_ids"]
    split = [i for ch in text for i in hf(ch, add_special_tokens=False)["input_ids"]]
    assert split != canonical and hf.decode(split) == text
    action = split + [hf.eos_token_id]
    adapter = TextEnvAdapter(ScriptEnv("q", [("more", Source.ENV)]), r)
    ctx, spans = _episode(adapter, [action])
    assert ctx[spans[0][0]:spans[0][1]] == action
    assert ctx == r.first("q") + action + r.reply("more", "user")
    assert ctx != _template(hf, adapter.messages)


def test_tool_role_falls_back_to_user_without_a_tool_role(tmp_path):
    assert ChatRenderer(char_chat(tmp_path / "a")).role_for("tool") == "tool"
    r = ChatRenderer(char_chat(tmp_path / "b", NO_TOOL))
    assert r.role_for("tool") == "user" and r.role_for("user") == "user"
    adapter = TextEnvAdapter(ScriptEnv("q", [("7", Source.TOOL)]), r)
    out = adapter.reset(0), adapter.step(CharTokenizer().encode("3+4") + [2])
    assert out[1].observation.source is Source.TOOL and out[1].observation.role == "user"
    assert adapter.messages[-1] == {"role": "user", "content": "7"}
    assert out[0].tokens + CharTokenizer().encode("3+4") + [2] + out[1].observation.tokens == \
        _template(r.hf, adapter.messages)


def test_template_not_append_only_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="not append-only.*not closed by a stop token"):
        ChatRenderer(char_chat(tmp_path / "a", NO_CLOSE))
    drops_past = BRACKETS.replace("{{ m['content'] }}", "{% if m['role'] != 'assistant' or loop.last %}"
                                  "{{ m['content'] }}{% endif %}")
    with pytest.raises(ValueError, match=r"tokenizer '.*' is not append-only"):
        ChatRenderer(char_chat(tmp_path / "b", drops_past))
    with pytest.raises(ValueError, match="no chat template"):
        ChatRenderer(char_chat(tmp_path / "c", ""))


def test_chat_renderer_takes_tethers_hf_tokenizer(tmp_path):
    from tether.models.hf import HFTokenizer

    hf = char_chat(tmp_path)
    wrapped, raw = ChatRenderer(HFTokenizer(hf)), ChatRenderer(hf)
    assert wrapped.first("go") == raw.first("go") == HFTokenizer(hf).encode("go")  # what encode_prompt gives
    assert wrapped.reply("x", "tool") == raw.reply("x", "tool")
