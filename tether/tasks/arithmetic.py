"""Built-in task ``arithmetic``: multi-digit +, -, x problems such as ``12+7=`` -> ``19``.

Prompts are short and use printable ASCII only (the built-in model is a character-level LM):
``<a><op><b>=`` with op one of ``+ - *``; the answer is the exact integer result in decimal and the
reference solution is the answer text. Difficulty knobs: operand digit counts and the operators.
Each operand draws its digit count uniformly from ``[min_digits, max_digits]``, then a uniform
number with that many digits (1-digit numbers include 0).

Held-out split: a problem is held out iff the hash of its canonical key (``problem_key``) falls below ``heldout_fraction``
(see ``tether.tasks.procedural``); ``sample`` never produces one, ``eval_examples`` only those.
Reward: exact match of the completion's first line against the answer (``rewards.exact_match``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tether.tasks.base import Example
from tether.tasks.procedural import ProceduralTask
from tether.tasks.rewards import exact_match
from tether.tasks.rewards import reward_ref as ref_of

OPS = ("+", "-", "*")


def _count_numbers(digits: int) -> int:
    return 10 if digits == 1 else 9 * 10 ** (digits - 1)


@dataclass(frozen=True)
class ArithmeticConfig:
    min_digits: int = 1
    """Fewest digits of an operand (>= 1)."""
    max_digits: int = 2
    """Most digits of an operand (<= 9)."""
    ops: tuple[str, ...] = OPS
    """Operators to draw from, a subset of + - * (a string like '+-' is accepted)."""
    allow_negative: bool = False
    """If False, subtraction puts the larger operand first so answers are >= 0."""
    eval_size: int = 200
    """Number of held-out evaluation problems."""
    heldout_fraction: float = 0.1
    """Fraction of the problem space reserved for evaluation, in (0, 0.5]."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", tuple(self.ops))  # also turns "+-" into ("+", "-")
        if not isinstance(self.min_digits, int) or not 1 <= self.min_digits <= 9:
            raise ValueError(f"ArithmeticConfig.min_digits must be an int in [1, 9], got {self.min_digits!r}")
        if not isinstance(self.max_digits, int) or not self.min_digits <= self.max_digits <= 9:
            raise ValueError(
                f"ArithmeticConfig.max_digits must be an int in [min_digits={self.min_digits}, 9], got {self.max_digits!r}"
            )
        if not self.ops or any(op not in OPS for op in self.ops) or len(set(self.ops)) != len(self.ops):
            raise ValueError(f"ArithmeticConfig.ops must be distinct operators from {OPS}, got {self.ops!r}")
        if not isinstance(self.eval_size, int) or self.eval_size < 1:
            raise ValueError(f"ArithmeticConfig.eval_size must be an int >= 1, got {self.eval_size!r}")
        if not 0 < self.heldout_fraction <= 0.5:
            raise ValueError(f"ArithmeticConfig.heldout_fraction must be in (0, 0.5], got {self.heldout_fraction!r}")
        expected = self.problem_space_size() * self.heldout_fraction
        if expected < 2 * self.eval_size:
            raise ValueError(
                f"ArithmeticConfig.eval_size={self.eval_size} is too large: about {expected:.0f} held-out problems "
                f"exist for digits {self.min_digits}..{self.max_digits} and ops {''.join(self.ops)} "
                "(need at least twice eval_size); lower eval_size or raise max_digits"
            )

    def problem_space_size(self) -> int:
        """Number of distinct problems (prompts) this config can produce."""
        n = sum(_count_numbers(d) for d in range(self.min_digits, self.max_digits + 1))
        size = 0
        for op in self.ops:
            size += n * (n + 1) // 2 if op == "-" and not self.allow_negative else n * n
        return size


def problem_key(a: int, op: str, b: int) -> str:
    """Canonical form: operands of the commutative + and * are ordered, so ``3+2=`` and ``2+3=``
    are one problem and always land in the same split."""
    if op in "+*" and a > b:
        a, b = b, a
    return f"{a}{op}{b}"


class ArithmeticTask(ProceduralTask):
    name = "arithmetic"
    has_expert_solutions = True
    """Every problem carries its solution (CalibRL / RL-PLUS can train on it)."""
    salt = "tether-arith-v1"
    reward_ref = ref_of("exact_match")
    """tether's own ``exact_match``: called in the trainer's process unless reward workers are asked for."""

    def __init__(self, config: ArithmeticConfig | None = None) -> None:
        self.config = config or ArithmeticConfig()
        self.heldout_fraction = self.config.heldout_fraction
        self.eval_size = self.config.eval_size

    def _operand(self, rng: random.Random) -> int:
        digits = rng.randint(self.config.min_digits, self.config.max_digits)
        low = 0 if digits == 1 else 10 ** (digits - 1)
        return rng.randint(low, 10**digits - 1)

    def draw(self, rng: random.Random) -> tuple[str, Example]:
        op = rng.choice(self.config.ops)
        a, b = self._operand(rng), self._operand(rng)
        if op == "-" and not self.config.allow_negative and a < b:
            a, b = b, a
        value = a + b if op == "+" else a - b if op == "-" else a * b
        prompt = f"{a}{op}{b}="
        answer = str(value)
        return problem_key(a, op, b), Example(prompt=prompt, answer=answer, solution=answer)

    def reward(self, prompt: str, completion: str, answer: str) -> float:
        return exact_match(prompt, completion, answer)
