"""Bookkeeping shared by the built-in text environments: turns, the end of an episode, option checks.

Conventions every built-in follows (docs/agents.md):

* ``reset(seed)`` draws the episode from ``random.Random(seed)`` only, so a seed and a list of actions
  always give the same observations and rewards.
* ``step(action)`` strips surrounding whitespace before reading the action. An action it cannot read
  gets a short error reply starting with ``?`` (reward 0, the episode goes on, the turn counts).
* Every step's ``info`` carries ``success`` (False until the episode is won) and ``state`` (a hashable
  id of what the policy knows: equal ids are the same decision point, GiGPO's anchor states).
* The environment never ends an episode for running out of turns: ``max_turns`` is the cap the episode
  runner applies (its outcome ``max_turns``, a truncation), so a time-out is never mistaken for a
  finished episode. ``step`` after a terminal step raises (that is a caller bug, not a policy action).
"""

from __future__ import annotations

from typing import Any

from tether.agent.env import TextStep
from tether.rollout import Source


def check_int(owner: str, name: str, value: Any, lo: int, hi: int | None = None) -> int:
    """``value`` if it is an int in [lo, hi] (hi None: no upper bound), else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{owner}: {name} must be an int {bound}, got {value!r}")
    return value


class TurnEnv:
    """Base of the built-ins: ``step`` counts the turn, refuses a finished episode and calls ``_act``.

    Subclasses set ``name``, ``max_turns``, implement ``reset`` (calling ``_begin``), ``_act(action)``
    (the stripped action text) and ``expert_action()``, and build their steps with ``_reply``/``_end``."""
    name = "env"
    max_turns = 1

    def _begin(self) -> None:
        self.turns = 0
        self.finished = False

    def step(self, action: str) -> TextStep:
        if not hasattr(self, "finished"):
            raise RuntimeError(f"{self.name}: step() before reset(seed)")
        if self.finished:
            raise RuntimeError(f"{self.name}: step() after the episode ended; call reset(seed) to start another")
        self.turns += 1
        out = self._act(str(action).strip())
        self.finished = out.done
        return out

    def _act(self, action: str) -> TextStep:
        raise NotImplementedError

    def _state(self) -> tuple:
        raise NotImplementedError

    def state_id(self) -> tuple:
        """The current decision point's id, as ``info["state"]`` gives it (the reset state's anchor)."""
        return self._state()

    def _reply(self, text: str, source: Source = Source.ENV, **info: Any) -> TextStep:
        """The episode goes on: ``text`` is shown next, no reward."""
        return TextStep(text, 0.0, False, {"success": False, "state": self._state(), **info}, source)

    def _end(self, won: bool, **info: Any) -> TextStep:
        """The episode is over: reward 1 and success if ``won``, else 0."""
        return TextStep(None, 1.0 if won else 0.0, True, {"success": won, "state": self._state(), **info})
