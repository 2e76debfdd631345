"""Tiny text environments for the agent tests (importable as ``tests.agent.toy_envs:Name``)."""

from __future__ import annotations

import random

from tether.agent.env import TextStep
from tether.rollout import Source


class Copy:
    """Say the letter shown, twice in a row: turn 1's prompt shows it, turn 2's reply shows it again (a
    tool reply). Reward 0.5 per right answer; success when both are right."""
    max_turns = 2

    def __init__(self, letters: str = "ab") -> None:
        self.letters = letters

    def reset(self, seed: int) -> str:
        rng = random.Random(seed)
        self.target = [rng.choice(self.letters) for _ in range(2)]
        self.k, self.right = 0, 0
        return f"say {self.target[0]}\n"

    def expert_action(self) -> str:
        return self.target[self.k]

    def step(self, action: str) -> TextStep:
        ok = action.strip() == self.target[self.k]
        self.right += ok
        self.k += 1
        if self.k == 2:
            return TextStep(None, 0.5 * ok, True, {"success": self.right == 2})
        return TextStep(f"\nsay {self.target[1]}\n", 0.5 * ok, False, {}, source=Source.TOOL)
