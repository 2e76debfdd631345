"""``countdown``: reach a target from given numbers, with a tool that evaluates candidate expressions.

The prompt is the countdown task's problem (``tether.tasks.countdown``, drawn from the seed; solvable by
construction)::

    make 31 from 3,7,25:

Actions (case and whitespace around the parts ignored):

* ``C:<expr>`` asks the tool for the value of an expression over the given numbers (each at most once,
  operators from ``ops``). The reply (``Source.TOOL``) is ``=<value>`` (``=31``, ``=7/2``) or an error:
  ``?parse`` (not an expression of the grammar), ``?nums`` (a number not given, or used too often),
  ``?op`` (an operator not allowed), ``?div0``.
* ``A:<expr>`` submits an answer: the episode ends with reward 1 if the expression uses only the given
  numbers (each at most once), only ``ops``, and equals the target; else 0. A submission that does not
  parse gets ``?parse`` instead and the episode goes on.
* Anything else gets ``?format`` and counts as a turn.

Parsing, the number check and exact evaluation are countdown's (no ``eval``). The expert submits the
generator's solution; with ``expert_uses_tool`` (default) it first checks it with the tool (two turns),
which shows the warm-started policy how the tool is used.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from fractions import Fraction

from tether.agent.env import TextStep
from tether.agent.envs.base import TurnEnv, check_int
from tether.rollout import Source
from tether.tasks.countdown import (
    CountdownConfig,
    CountdownTask,
    ExpressionError,
    check_expression,
    evaluate,
    literals,
    operators,
    parse_countdown_answer,
    parse_expression,
)

_ACTION = re.compile(r"([CcAa])\s*:\s*(.*)", re.ASCII | re.DOTALL)


class Countdown(TurnEnv):
    """Countdown with an expression tool (module docstring).

    ``n_numbers``, ``max_number``, ``max_target`` and ``ops`` are the countdown task's knobs
    (``CountdownConfig``; numbers from 1, targets from 1). ``expert_uses_tool``: the expert checks its
    solution with the tool before submitting it. ``max_turns``: the turn cap."""
    name = "countdown"

    def __init__(self, n_numbers: int = 3, max_number: int = 20, max_target: int = 100, ops: str = "+-*/",
                 max_turns: int = 4, expert_uses_tool: bool = True) -> None:
        self.max_turns = check_int(self.name, "max_turns", max_turns, 1)
        self.task = CountdownTask(CountdownConfig(n_numbers=n_numbers, max_number=max_number,
                                                  max_target=max_target, ops=tuple(ops)))
        self.ops = self.task.config.ops
        self.expert_uses_tool = bool(expert_uses_tool)

    def reset(self, seed: int) -> str:
        _, example = self.task.draw(random.Random(seed))
        self.prompt, self.solution = example.prompt, example.solution
        self.target, self.numbers = parse_countdown_answer(example.answer)
        self.confirmed: str | None = None
        """An expression the tool showed to reach the target (the expert submits it)."""
        self._begin()
        return f"{self.prompt}\n"

    def _state(self) -> tuple:
        return (self.name, self.prompt, self.confirmed is not None)

    def _value(self, text: str) -> Fraction | str:
        try:
            node = parse_expression(text)
        except ExpressionError:
            return "parse"
        if Counter(literals(node)) - Counter(self.numbers):
            return "nums"
        if not operators(node) <= set(self.ops):
            return "op"
        try:
            return evaluate(node)
        except ExpressionError:
            return "div0"

    def _act(self, action: str) -> TextStep:
        m = _ACTION.fullmatch(action)
        if m is None:
            return self._reply("?format\n", invalid=True)
        kind, expr = m.group(1).upper(), m.group(2).strip()
        value = self._value(expr)
        if kind == "A":
            if value == "parse":
                return self._reply("?parse\n", invalid=True)
            return self._end(check_expression(expr, self.numbers, self.target, self.ops) is None)
        if isinstance(value, str):
            return self._reply(f"?{value}\n", Source.TOOL, invalid=True)
        if value == self.target and self.confirmed is None:
            self.confirmed = expr
        return self._reply(f"={value}\n", Source.TOOL)

    def expert_action(self) -> str:
        """Submit an expression the tool confirmed; else check the solution first (or submit it directly)."""
        if self.confirmed is not None:
            return f"A:{self.confirmed}"
        return f"C:{self.solution}" if self.expert_uses_tool else f"A:{self.solution}"
