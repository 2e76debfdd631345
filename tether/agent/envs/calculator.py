"""``calculator``: arithmetic the policy should not do in its head, with a calculator tool.

The prompt is a problem ``a*b+c`` or ``a*b-c`` (``a``, ``b``, ``c`` of ``digits`` digits, drawn from the seed)::

    37*24+5=?

Actions (case and whitespace around the parts ignored):

* ``C:<expr>`` calls the calculator. ``<expr>`` is integers, ``+ - *`` and parentheses, at most
  ``max_expr_chars`` characters; the tool's reply (``Source.TOOL``) is ``=<value>``, e.g. ``=893``, or an
  error: ``?parse`` (not in that grammar: names, ``**``, unary minus ...), ``?op`` (an operator other than
  ``+ - *``), ``?long`` (too long), ``?big`` (``|value|`` over ``max_abs``).
* ``A:<integer>`` answers: the episode ends with reward 1 if it is the problem's value, else 0.
* Anything else gets ``?format`` (an environment reply) and counts as a turn.

The expression is parsed by countdown's recursive-descent parser (``tether.tasks.countdown``: a tokenizer
that accepts only digits, ``+ - * / ( )`` and spaces, bounded length, nesting and literal size) and
evaluated exactly; nothing is ever passed to ``eval``. The expert calls the tool on the problem, then
answers the value the tool returned (two turns, about 40 characters).
"""

from __future__ import annotations

import random
import re

from tether.agent.env import TextStep
from tether.agent.envs.base import TurnEnv, check_int
from tether.rollout import Source
from tether.tasks.countdown import ExpressionError, evaluate, operators, parse_expression

_ACTION = re.compile(r"([CcAa])\s*:\s*(.*)", re.ASCII | re.DOTALL)
_INTEGER = re.compile(r"[+-]?[0-9]{1,18}", re.ASCII)
TOOL_OPS = frozenset("+-*")


def calculate(text: str, max_chars: int = 32, max_abs: int = 10**12) -> int | str:
    """The value of ``text`` (integers, ``+ - *``, parentheses), or the short error code the tool replies
    (``parse``, ``op``, ``long``, ``big``). Never evaluates code."""
    text = text.strip()
    if len(text) > max_chars:
        return "long"
    try:
        node = parse_expression(text)
    except ExpressionError:
        return "parse"
    if not operators(node) <= TOOL_OPS:
        return "op"
    value = evaluate(node)  # + - * of integers: an integral Fraction, no division by zero possible
    if abs(value) > max_abs:
        return "big"
    return int(value)


class Calculator(TurnEnv):
    """Arithmetic with a calculator tool (module docstring).

    ``digits``: digits of each operand (1..4). ``max_expr_chars``: longest tool expression (1..64).
    ``max_abs``: largest absolute value the tool reports. ``max_turns``: the turn cap."""
    name = "calculator"

    def __init__(self, digits: int = 2, max_turns: int = 4, max_expr_chars: int = 32, max_abs: int = 10**12) -> None:
        self.digits = check_int(self.name, "digits", digits, 1, 4)
        self.max_turns = check_int(self.name, "max_turns", max_turns, 1)
        self.max_expr_chars = check_int(self.name, "max_expr_chars", max_expr_chars, 1, 64)
        self.max_abs = check_int(self.name, "max_abs", max_abs, 1)

    def reset(self, seed: int) -> str:
        rng = random.Random(seed)
        lo, hi = 10 ** (self.digits - 1), 10 ** self.digits - 1
        a, b, c = (rng.randint(lo, hi) for _ in range(3))
        self.problem = f"{a}*{b}{rng.choice('+-')}{c}"
        self.value = calculate(self.problem, 64, 10**18)
        self.revealed = False
        self._begin()
        return f"{self.problem}=?\n"

    def _state(self) -> tuple:
        return (self.name, self.problem, self.revealed)

    def _act(self, action: str) -> TextStep:
        m = _ACTION.fullmatch(action)
        if m is None:
            return self._reply("?format\n", invalid=True)
        kind, arg = m.group(1).upper(), m.group(2).strip()
        if kind == "A":
            if _INTEGER.fullmatch(arg) is None:
                return self._reply("?format\n", invalid=True)
            return self._end(int(arg) == self.value)
        out = calculate(arg, self.max_expr_chars, self.max_abs)
        if isinstance(out, str):
            return self._reply(f"?{out}\n", Source.TOOL, invalid=True)
        self.revealed = self.revealed or out == self.value
        return self._reply(f"={out}\n", Source.TOOL)

    def expert_action(self) -> str:
        """Answer once the tool has shown the problem's value; until then, ask the tool for it."""
        return f"A:{self.value}" if self.revealed else f"C:{self.problem}"
