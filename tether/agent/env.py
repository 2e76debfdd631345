"""The environment protocol: token-native, with a text convenience.

A multi-turn episode alternates the policy's action and the environment's reply::

    obs_0 = env.reset(seed)                      # the prompt (Source.PROMPT)
    repeat: action_k = policy(obs_0, a_0, obs_1, ..., obs_k)   # tokens the engine sampled (Source.POLICY)
            step_k = env.step(action_k)          # reward_k, done_k, and obs_{k+1} (Source.ENV or Source.TOOL)

:class:`Env` is token-native: it receives the action's token ids exactly as sampled and returns the reply as
token ids, which the episode runner appends after the action (``tether.agent.episodes``). Nothing already in
the context is ever re-rendered or re-tokenised, so the trained row is the sampled row.

:class:`TextEnv` is the convenience most environments implement: text in, text out.
:class:`tether.agent.render.TextEnvAdapter` turns one into an :class:`Env` with a renderer that formats the
first observation once (the chat template, where the tokenizer has one) and every later reply as tokens to
append, and keeps the episode's messages (role / content) for the tokenisation-drift meter.

Both kinds must be deterministic under ``reset(seed)``: the same seed and the same actions give the same
observations and rewards. ``reward`` may be given at every step (step rewards); the episode's return is
their sum. ``info`` is free-form; ``info["success"]`` (bool), when an environment sets it on the last step,
is what evaluation reports as success (default: return > 0).

Anchor states (GiGPO's step groups, ``tether.agent.credit.gigpo``): ``info["state"]`` (hashable) names the
decision point the step leads to, and an optional method ``state_id()`` returns the current one at any time;
the episode runner asks ``state_id()`` after ``reset`` (and after a step whose ``info`` has no ``state``), so
a state revisited later shares the first turn's anchor. Without either, the anchor is the observation's
tokens (``tether.agent.episodes.EpisodeBatch.state_EK``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from tether.rollout import Source


@dataclass(frozen=True)
class Observation:
    """What the environment shows the policy: token ids to append, who produced them, and their text."""
    tokens: list[int]
    source: Source = Source.ENV
    """``PROMPT`` for the first observation, ``ENV`` or ``TOOL`` for replies."""
    text: str | None = None
    """The text the tokens render (logs, the drift meter); None for a purely token-level environment."""
    role: str = "user"
    """The chat role of the reply when re-rendered as a message (``user`` or ``tool``)."""


@dataclass(frozen=True)
class StepResult:
    """One step of an :class:`Env`: the reply to the action (None once the episode is over), its reward."""
    observation: Observation | None
    reward: float
    done: bool
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Env(Protocol):
    """A token-native environment (module docstring)."""

    def reset(self, seed: int) -> Observation:
        """Start an episode; returns the first observation (``Source.PROMPT``)."""
        ...

    def step(self, action: list[int]) -> StepResult:
        """Apply the policy's action (token ids as sampled, a final EOS included when one was generated)."""
        ...


@dataclass(frozen=True)
class TextStep:
    """One step of a :class:`TextEnv`."""
    observation: str | None
    """The reply shown to the policy next; None (or ignored) once ``done``."""
    reward: float
    done: bool
    info: dict[str, Any] = field(default_factory=dict)
    source: Source = Source.ENV
    """``ENV`` for the environment's feedback, ``TOOL`` for a tool's output."""


@runtime_checkable
class TextEnv(Protocol):
    """A text environment: ``reset(seed) -> str`` (the first user message), ``step(action text) -> TextStep``.

    The action text is the decoded completion without its final EOS token. ``max_turns`` (optional attribute)
    caps the episode's number of actions; the runner also enforces the run's ``max_turns``."""

    def reset(self, seed: int) -> str:
        ...

    def step(self, action: str) -> TextStep:
        ...
