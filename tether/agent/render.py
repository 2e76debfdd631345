"""Text environments as token-native ones: render the first observation once, append every reply as tokens.

A :class:`Renderer` turns text into the tokens an episode appends; :class:`TextEnvAdapter` wraps a
:class:`~tether.agent.env.TextEnv` so the episode runner sees an :class:`~tether.agent.env.Env`. The sampled
action's tokens are never re-encoded: the adapter only decodes them to give the environment its text.
"""

from __future__ import annotations

from typing import Protocol

from tether.agent.env import Env, Observation, StepResult, TextEnv
from tether.rollout import Source


class Renderer(Protocol):
    """Text to the tokens an episode appends (module docstring)."""

    def first(self, text: str) -> list[int]:
        """Prompt tokens of the episode's first user message."""
        ...

    def reply(self, text: str, role: str, *, closed: bool = True) -> list[int]:
        """Tokens to append after a sampled action for a reply of ``role`` (``user`` or ``tool``).

        ``closed``: the action ended with a stop token (``closed(action)``); when it did not (the length
        limit cut it), the reply first closes the assistant turn."""
        ...

    def closed(self, ids: list[int]) -> bool:
        """Whether a sampled action ended the assistant turn (its last token is a stop token)."""
        ...

    def role_for(self, role: str) -> str:
        """The chat role a reply of ``role`` is rendered as (``tool`` becomes ``user`` where the template
        has no tool role)."""
        ...

    def action_text(self, ids: list[int]) -> str:
        """The action's text as the environment reads it (no trailing EOS)."""
        ...


class PlainRenderer:
    """No chat template (tether's character tokenizer): the text's own tokens, nothing around them.

    ``first(text) = encode(text)`` with no BOS (how ``encode_prompt`` encodes a single-turn prompt for this
    tokenizer); ``reply(text) = encode(text)``: no separator is added, so an environment starts its reply
    with its own (the built-in environments begin replies with a newline). There is no turn structure to
    close, so an action cut by the length limit is followed directly by the reply (``closed`` is ignored)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = tuple(getattr(tokenizer, "eos_ids", (tokenizer.eos_id,)))

    def first(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def reply(self, text: str, role: str, *, closed: bool = True) -> list[int]:
        return self.tokenizer.encode(text)

    def closed(self, ids: list[int]) -> bool:
        return bool(ids) and ids[-1] in self.eos_ids

    def role_for(self, role: str) -> str:
        return role

    def action_text(self, ids: list[int]) -> str:
        if self.closed(ids):
            ids = ids[:-1]
        return self.tokenizer.decode(ids)

    def rerender(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        """What a framework that keeps messages would train on: every message's text encoded again, an EOS
        after each assistant message (no template, so no generation prompt). For this tokenizer it equals the
        sampled row whenever each action's ids are its text's encoding (the drift meter's reference)."""
        ids: list[int] = []
        for m in messages:
            ids += self.tokenizer.encode(m["content"])
            if m["role"] == "assistant":
                ids.append(self.eos_ids[0])
        return ids


_PROBE_USER, _PROBE_ACTION = "hi", "ok"
_SENTINEL = "@@tether-reply@@"
_PROBE_REPLIES = ("fine", "\nsay b\n")


def _ids(out) -> list[int]:
    """``apply_chat_template(tokenize=True)``'s ids, whichever container this transformers version returns."""
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return [int(i) for i in out]


class ChatRenderer:
    """A Hugging Face tokenizer's chat template, rendered once and then only appended to.

    * ``first(text)``: ``apply_chat_template([user: text], add_generation_prompt=True)``.
    * ``reply(text, role)``: the tokens the template puts after an assistant turn's end-of-turn token for a
      reply of ``role`` followed by the next generation prompt. They are found once per role, at construction,
      on a dummy conversation: render ``[user, assistant, role: SENTINEL]`` with the generation prompt as text;
      after the first user turn and the assistant's content comes the end-of-turn token (one of the
      tokenizer's stop tokens, e.g. Qwen / SmolLM's ``<|im_end|>``) and then ``pre SENTINEL post`` (for those
      templates ``pre = "\\n<|im_start|>user\\n"``, ``post = "<|im_end|>\\n<|im_start|>assistant\\n"``).
      ``reply(text) = encode(pre + text + post)`` without special tokens. The delta starts right after the
      sampled end-of-turn token: the ``"\\n"`` the template prints after ``<|im_end|>`` belongs to the reply.
      With this, the context after each reply equals ``apply_chat_template(messages, add_generation_prompt=True)``
      of the conversation so far, provided the template is append-only for it and the sampled action's
      tokens are the ones its text encodes to (tests/agent/test_render.py checks the equality).
    * ``closed=False`` (the length limit cut the action before its end-of-turn token): the reply starts with
      the end-of-turn token, so the turn is closed as the template would close it.
    * Tool replies use role ``tool`` when the template renders a ``tool`` message (the probe's sentinel
      appears in the rendering), else ``user`` (``role_for``).
    * ``action_text(ids)``: the ids without a trailing stop token, decoded with special tokens kept.

    Raises ``ValueError`` naming the tokenizer when the template is not append-only even on the dummy
    conversation (the rendering with the reply does not start with the rendering without it, or the
    assistant turn is not closed by a stop token, or the probe replies do not tokenise as the template does).

    ``tokenizer``: tether's ``HFTokenizer`` (``tether.models.hf``) or a ``transformers`` tokenizer.
    """

    def __init__(self, tokenizer) -> None:
        hf = getattr(tokenizer, "tokenizer", tokenizer)
        if not hasattr(hf, "apply_chat_template") or not getattr(hf, "chat_template", None):
            raise ValueError(f"ChatRenderer: tokenizer {self._name(hf)} has no chat template (use PlainRenderer)")
        self.hf = hf
        eos = getattr(tokenizer, "eos_ids", None)
        if eos is None:
            eos = [hf.eos_token_id] if hf.eos_token_id is not None else []
        self.eos_ids = tuple(int(i) for i in eos)
        if not self.eos_ids:
            raise ValueError(f"ChatRenderer: tokenizer {self._name(hf)} has no EOS token")
        self._roles = {"user": "user", "tool": "tool" if self._renders_tool() else "user"}
        self._close_id: int | None = None
        self._wrap: dict[str, tuple[str, str]] = {}
        for role in sorted(set(self._roles.values())):
            self._wrap[role] = self._delta(role)
        self._check()

    @staticmethod
    def _name(hf) -> str:
        return repr(getattr(hf, "name_or_path", None) or type(hf).__name__)

    def _text(self, messages: list[dict], gen: bool) -> str:
        return self.hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)

    def _render(self, messages: list[dict], gen: bool) -> list[int]:
        return _ids(self.hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True))

    def _encode(self, text: str) -> list[int]:
        return [int(i) for i in self.hf(text, add_special_tokens=False)["input_ids"]]

    def _dummy(self, role: str, content: str) -> list[dict]:
        return [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_ACTION},
                {"role": role, "content": content}]

    def _renders_tool(self) -> bool:
        try:
            return _SENTINEL in self._text(self._dummy("tool", _SENTINEL), True)
        except Exception:  # templates without a tool role often raise_exception() on it
            return False

    def _refuse(self, why: str) -> ValueError:
        return ValueError(f"ChatRenderer: the chat template of tokenizer {self._name(self.hf)} is not append-only "
                          f"on a two-turn dummy conversation ({why}); tether cannot append replies as tokens with it")

    def _delta(self, role: str) -> tuple[str, str]:
        head = self._text([{"role": "user", "content": _PROBE_USER}], True) + _PROBE_ACTION
        full = self._text(self._dummy(role, _SENTINEL), True)
        if not full.startswith(head):
            raise self._refuse(f"with a {role} reply the rendering does not start with the first turn and the action")
        rest = full[len(head):]
        close = [(i, t) for i in self.eos_ids if (t := self.hf.convert_ids_to_tokens(i)) and rest.startswith(t)]
        if not close:
            raise self._refuse("the assistant turn is not closed by a stop token "
                               f"({[self.hf.convert_ids_to_tokens(i) for i in self.eos_ids]})")
        close_id, close_text = max(close, key=lambda c: len(c[1]))
        if self._close_id is not None and close_id != self._close_id:
            raise self._refuse("different roles close the assistant turn with different tokens")
        self._close_id = close_id
        after = rest[len(close_text):]
        if after.count(_SENTINEL) != 1:
            raise self._refuse(f"the {role} reply's content does not appear exactly once")
        pre, post = after.split(_SENTINEL)
        return pre, post

    def _check(self) -> None:
        start = self._render([{"role": "user", "content": _PROBE_USER}], True) + self._encode(_PROBE_ACTION)
        for role in self._wrap:
            for text in _PROBE_REPLIES:
                want = self._render(self._dummy(role, text), True)
                got = start + [self._close_id] + self.reply(text, role)
                if got != want:
                    raise self._refuse(f"a {role} reply {text!r} appended as tokens differs from the template's tokens")

    def first(self, text: str) -> list[int]:
        return self._render([{"role": "user", "content": text}], True)

    def role_for(self, role: str) -> str:
        if role not in self._roles:
            raise ValueError(f"ChatRenderer: reply role must be 'user' or 'tool', got {role!r}")
        return self._roles[role]

    def reply(self, text: str, role: str, *, closed: bool = True) -> list[int]:
        pre, post = self._wrap[self.role_for(role)]
        ids = self._encode(pre + text + post)
        return ids if closed else [self._close_id] + ids

    def closed(self, ids: list[int]) -> bool:
        return bool(ids) and (ids[-1] in self.eos_ids or ids[-1] == self._close_id)

    def action_text(self, ids: list[int]) -> str:
        if self.closed(ids):
            ids = ids[:-1]
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def rerender(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        """The chat template over the whole conversation: what a framework that keeps messages trains on."""
        msgs = [{**m, "role": self._roles.get(m["role"], m["role"])} if m["role"] != "assistant" else m
                for m in messages]
        return _ids(self.hf.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=True))


class TextEnvAdapter:
    """A :class:`TextEnv` seen as a token-native :class:`Env`; keeps the episode's ``messages``.

    ``messages`` is the conversation as a chat template would see it: ``user`` (the reset text), then per turn
    ``assistant`` (the action's text, ``renderer.action_text``) and, unless the episode ended, the reply
    (``user`` or ``tool``: ``renderer.role_for`` of the step's source). The sampled action's ids are only
    decoded (for the environment and ``messages``), never re-encoded; the returned observation tokens are the
    renderer's ``reply``, closing the turn first when the action was cut by the length limit."""

    def __init__(self, env: TextEnv, renderer: Renderer) -> None:
        self.env, self.renderer = env, renderer
        self.max_turns = getattr(env, "max_turns", None)
        self.messages: list[dict] = []
        if callable(getattr(env, "state_id", None)):  # the optional anchor-state hook (tether.agent.env)
            self.state_id = env.state_id

    def reset(self, seed: int) -> Observation:
        text = self.env.reset(seed)
        self.messages = [{"role": "user", "content": text}]
        return Observation(self.renderer.first(text), Source.PROMPT, text)

    def step(self, action: list[int]) -> StepResult:
        text = self.renderer.action_text(action)
        self.messages.append({"role": "assistant", "content": text})
        out = self.env.step(text)
        if out.done or out.observation is None:
            return StepResult(None, out.reward, True, out.info)
        role = self.renderer.role_for("tool" if out.source is Source.TOOL else "user")
        self.messages.append({"role": role, "content": out.observation})
        tokens = self.renderer.reply(out.observation, role, closed=self.renderer.closed(action))
        return StepResult(Observation(tokens, out.source, out.observation, role), out.reward, False, out.info)


def as_env(env: TextEnv | Env, renderer: Renderer) -> Env:
    """``env`` itself when it is token-native (its ``reset`` returns an :class:`Observation`), else adapted."""
    return env if getattr(env, "token_native", False) else TextEnvAdapter(env, renderer)
