"""``guess``: find a secret number in 1..n from "lower" / "higher" feedback.

The prompt names the range; the secret is drawn from the seed::

    guess 1-32

An action is an integer (surrounding whitespace ignored). The reply is ``<`` (the secret is lower than the
guess) or ``>`` (higher), then a newline; with ``show_range`` it also shows the range still possible,
``<1-15``. The right guess ends the episode with reward 1. Anything that is not an integer in 1..n gets
``?`` and counts as a turn.

Binary search needs at most ``ceil(log2(n + 1))`` guesses: 6 for the default n = 32, the default
``max_turns``. The expert guesses the middle of the range the feedback so far allows, ``(lo + hi) // 2``.
"""

from __future__ import annotations

import random
import re

from tether.agent.env import TextStep
from tether.agent.envs.base import TurnEnv, check_int

_INTEGER = re.compile(r"[0-9]{1,9}", re.ASCII)


def guesses_needed(n: int) -> int:
    """Worst-case number of guesses of binary search over 1..n: the least k with 2**k - 1 >= n."""
    return n.bit_length()


class Guess(TurnEnv):
    """Guess the number (module docstring). ``n``: the range 1..n (2..999). ``max_turns``: the turn cap
    (at least ``guesses_needed(n)`` so that the optimal policy always wins). ``show_range``: replies show
    the range left."""
    name = "guess"

    def __init__(self, n: int = 32, max_turns: int = 6, show_range: bool = False) -> None:
        self.n = check_int(self.name, "n", n, 2, 999)
        self.max_turns = check_int(self.name, "max_turns", max_turns, 1)
        if max_turns < guesses_needed(n):
            raise ValueError(f"{self.name}: 1..{n} may need {guesses_needed(n)} guesses; max_turns is {max_turns}")
        self.show_range = bool(show_range)

    def reset(self, seed: int) -> str:
        self.secret = random.Random(seed).randint(1, self.n)
        self.lo, self.hi = 1, self.n
        self._begin()
        return f"guess 1-{self.n}\n"

    def _state(self) -> tuple:
        return (self.name, self.n, self.secret, self.lo, self.hi)

    def _act(self, action: str) -> TextStep:
        if _INTEGER.fullmatch(action) is None or not 1 <= int(action) <= self.n:
            return self._reply("?\n", invalid=True)
        g = int(action)
        if g == self.secret:
            return self._end(True)
        if self.secret < g:
            self.hi, sign = min(self.hi, g - 1), "<"
        else:
            self.lo, sign = max(self.lo, g + 1), ">"
        return self._reply(f"{sign}{self.lo}-{self.hi}\n" if self.show_range else f"{sign}\n")

    def expert_action(self) -> str:
        """The middle of the range still possible."""
        return str((self.lo + self.hi) // 2)
