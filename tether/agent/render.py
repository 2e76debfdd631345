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
    def first(self, text: str) -> list[int]:
        """Prompt tokens of the episode's first user message."""
        ...

    def reply(self, text: str, role: str) -> list[int]:
        """Tokens to append after a sampled action for a reply of ``role`` (``user`` or ``tool``)."""
        ...

    def action_text(self, ids: list[int]) -> str:
        """The action's text as the environment reads it (no trailing EOS)."""
        ...


class PlainRenderer:
    """No chat template (tether's character tokenizer): the text's own tokens, nothing around them."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = tuple(getattr(tokenizer, "eos_ids", (tokenizer.eos_id,)))

    def first(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def reply(self, text: str, role: str) -> list[int]:
        return self.tokenizer.encode(text)

    def action_text(self, ids: list[int]) -> str:
        if ids and ids[-1] in self.eos_ids:
            ids = ids[:-1]
        return self.tokenizer.decode(ids)


class TextEnvAdapter:
    """A :class:`TextEnv` seen as a token-native :class:`Env`; keeps the episode's ``messages``."""

    def __init__(self, env: TextEnv, renderer: Renderer) -> None:
        self.env, self.renderer = env, renderer
        self.max_turns = getattr(env, "max_turns", None)
        self.messages: list[dict] = []

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
        role = "tool" if out.source is Source.TOOL else "user"
        self.messages.append({"role": role, "content": out.observation})
        return StepResult(Observation(self.renderer.reply(out.observation, role), out.source, out.observation, role),
                          out.reward, False, out.info)


def as_env(env: TextEnv | Env, renderer: Renderer) -> Env:
    """``env`` itself when it is token-native (its ``reset`` returns an :class:`Observation`), else adapted."""
    return env if getattr(env, "token_native", False) else TextEnvAdapter(env, renderer)
