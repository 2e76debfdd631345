"""Built-in task ``countdown``: reach a target from given numbers with + - * / (each number at most once).

Prompt: ``make 31 from 3,7,25,2:``; a completion is an arithmetic expression such as ``25+7-2/2``.
Answer: ``"<target>|<n1>,<n2>,..."`` (``countdown_answer``), so the reward needs only the answer.
Solution: the expression the target was built from (it uses every number once).

Verification never evaluates code: ``parse_expression`` is a tokenizer plus a recursive-descent parser
accepting only non-negative integer literals, the binary operators ``+ - * /`` and parentheses
(no unary minus, no exponent, no names), within a length and nesting limit. The reward is 1.0 iff the
expression parses, the multiset of numbers it uses is contained in the given multiset, and its value,
computed exactly with ``fractions.Fraction``, equals the target (division by zero: 0.0). Anything
else scores 0.0. The completion is read up to its first newline.

Instances are solvable by construction: numbers are drawn, combined by a random expression tree whose
intermediate results stay positive integers, and kept when the value lies in the target range.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction

from tether.tasks.base import Example
from tether.tasks.procedural import ProceduralTask
from tether.tasks.rewards import RewardRef, first_line, register_builtin_reward

OPS = ("+", "-", "*", "/")
MAX_EXPRESSION_CHARS = 256
MAX_DEPTH = 32
MAX_LITERAL_DIGITS = 9
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


class ExpressionError(ValueError):
    """The text is not an expression of the countdown grammar, or cannot be evaluated."""


# ------------------------------------------------------------------------------ parse and evaluate
# Node: int (a literal) or tuple (op, left, right).

_TOKEN = re.compile(r"\s*(?:([0-9]+)|([-+*/()]))", re.ASCII)


def tokenize(text: str) -> list[str]:
    """Split into integer literals and the single characters ``+ - * / ( )``; anything else raises."""
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    tokens: list[str] = []
    pos = 0
    end = len(text.rstrip())
    while pos < end:
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ExpressionError(f"unexpected character {text[pos:].lstrip()[:1]!r} at {pos}")
        literal = m.group(1)
        if literal is not None:
            if len(literal) > MAX_LITERAL_DIGITS:
                raise ExpressionError(f"number {literal[:12]}... has more than {MAX_LITERAL_DIGITS} digits")
            if len(literal) > 1 and literal[0] == "0":
                raise ExpressionError(f"number {literal!r} has a leading zero")
            tokens.append(literal)
        else:
            tokens.append(m.group(2))
        pos = m.end()
    if not tokens:
        raise ExpressionError("empty expression")
    return tokens


class _Parser:
    # expr   := term (('+' | '-') term)*
    # term   := factor (('*' | '/') factor)*
    # factor := INTEGER | '(' expr ')'
    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.i = 0

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> str:
        tok = self.peek()
        if tok is None:
            raise ExpressionError("unexpected end of expression")
        self.i += 1
        return tok

    def expr(self, depth: int):
        node = self.term(depth)
        while self.peek() in ("+", "-"):
            op = self.take()
            node = (op, node, self.term(depth))
        return node

    def term(self, depth: int):
        node = self.factor(depth)
        while self.peek() in ("*", "/"):
            op = self.take()
            node = (op, node, self.factor(depth))
        return node

    def factor(self, depth: int):
        tok = self.take()
        if tok == "(":
            if depth >= MAX_DEPTH:
                raise ExpressionError(f"parentheses nested deeper than {MAX_DEPTH}")
            node = self.expr(depth + 1)
            if self.take() != ")":
                raise ExpressionError("expected ')'")
            return node
        if tok.isdigit():
            return int(tok)
        raise ExpressionError(f"expected a number or '(', got {tok!r}")


def parse_expression(text: str):
    """Parse ``text`` into a tree: an ``int`` literal or ``(op, left, right)``. Raises ExpressionError."""
    parser = _Parser(tokenize(text))
    node = parser.expr(0)
    if parser.peek() is not None:
        raise ExpressionError(f"unexpected {parser.peek()!r} after a complete expression")
    return node


def evaluate(node) -> Fraction:
    """Exact value of a parsed tree. Division by zero raises ExpressionError."""
    if isinstance(node, int):
        return Fraction(node)
    op, left, right = node
    a, b = evaluate(left), evaluate(right)
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if b == 0:
        raise ExpressionError("division by zero")
    return a / b


def literals(node) -> list[int]:
    """The integer literals of a parsed tree, left to right."""
    if isinstance(node, int):
        return [node]
    return literals(node[1]) + literals(node[2])


def operators(node) -> set[str]:
    if isinstance(node, int):
        return set()
    return {node[0]} | operators(node[1]) | operators(node[2])


def check_expression(text: str, numbers: list[int], target: int, ops: tuple[str, ...] = OPS) -> str | None:
    """None if ``text`` reaches ``target`` using each of ``numbers`` at most once; else the reason."""
    try:
        node = parse_expression(text)
    except ExpressionError as e:
        return f"parse: {e}"
    used = Counter(literals(node))
    missing = used - Counter(numbers)
    if missing:
        return f"uses numbers not given (or reused): {sorted(missing.elements())}"
    bad_ops = operators(node) - set(ops)
    if bad_ops:
        return f"uses operators not allowed: {sorted(bad_ops)}"
    try:
        value = evaluate(node)
    except ExpressionError as e:
        return f"evaluate: {e}"
    if value != target:
        return f"value {value} != target {target}"
    return None


# --------------------------------------------------------------------------------- answer format


def countdown_answer(target: int, numbers: list[int]) -> str:
    return f"{target}|{','.join(str(n) for n in numbers)}"


def parse_countdown_answer(answer: str) -> tuple[int, list[int]]:
    """``"31|3,7,25,2"`` -> ``(31, [3, 7, 25, 2])``; raises ValueError on another format."""
    m = re.fullmatch(r"\s*([0-9]+)\s*\|\s*([0-9]+(?:\s*,\s*[0-9]+)*)\s*", answer, re.ASCII)
    if m is None:
        raise ValueError(f"countdown answer must look like '31|3,7,25,2', got {answer!r}")
    return int(m.group(1)), [int(x) for x in m.group(2).split(",")]


def _check_answer(answer: str) -> str | None:
    try:
        parse_countdown_answer(answer)
    except ValueError as e:
        return str(e)
    return None


def countdown_reward(prompt: str, completion: str, answer: str) -> float:
    """1.0 iff the completion's first line reaches the answer's target from its numbers (all of + - * /)."""
    target, numbers = parse_countdown_answer(answer)
    return 1.0 if check_expression(first_line(completion), numbers, target) is None else 0.0


register_builtin_reward("countdown", countdown_reward, _check_answer, trusted=True)


# ------------------------------------------------------------------------------------------- task


@dataclass(frozen=True)
class CountdownConfig:
    n_numbers: int = 3
    """How many numbers each problem gives (2..6)."""
    min_number: int = 1
    """Smallest number drawn (>= 1)."""
    max_number: int = 20
    """Largest number drawn."""
    min_target: int = 1
    """Smallest target kept (>= 1)."""
    max_target: int = 100
    """Largest target kept."""
    ops: tuple[str, ...] = OPS
    """Operators the generator and the reward allow, a subset of + - * / (a string like '+-*' works)."""
    eval_size: int = 200
    """Number of held-out evaluation problems."""
    heldout_fraction: float = 0.1
    """Fraction of problems (by hash of sorted numbers and target) reserved for evaluation, in (0, 0.5]."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", tuple(self.ops))
        if not isinstance(self.n_numbers, int) or not 2 <= self.n_numbers <= 6:
            raise ValueError(f"CountdownConfig.n_numbers must be an int in [2, 6], got {self.n_numbers!r}")
        if not isinstance(self.min_number, int) or self.min_number < 1:
            raise ValueError(f"CountdownConfig.min_number must be an int >= 1, got {self.min_number!r}")
        if not isinstance(self.max_number, int) or not self.min_number <= self.max_number <= 10**6:
            raise ValueError(
                f"CountdownConfig.max_number must be an int in [min_number={self.min_number}, 1e6], got {self.max_number!r}"
            )
        if not isinstance(self.min_target, int) or self.min_target < 1:
            raise ValueError(f"CountdownConfig.min_target must be an int >= 1, got {self.min_target!r}")
        if not isinstance(self.max_target, int) or self.max_target < self.min_target:
            raise ValueError(
                f"CountdownConfig.max_target must be an int >= min_target={self.min_target}, got {self.max_target!r}"
            )
        if not self.ops or any(op not in OPS for op in self.ops) or len(set(self.ops)) != len(self.ops):
            raise ValueError(f"CountdownConfig.ops must be distinct operators from {OPS}, got {self.ops!r}")
        if not isinstance(self.eval_size, int) or self.eval_size < 1:
            raise ValueError(f"CountdownConfig.eval_size must be an int >= 1, got {self.eval_size!r}")
        if not 0 < self.heldout_fraction <= 0.5:
            raise ValueError(f"CountdownConfig.heldout_fraction must be in (0, 0.5], got {self.heldout_fraction!r}")


def render(node, parent_prec: int = 0, right_of: str | None = None) -> str:
    """Expression text with only the parentheses the parser needs to rebuild the same tree."""
    if isinstance(node, int):
        return str(node)
    op, left, right = node
    prec = _PREC[op]
    text = f"{render(left, prec)}{op}{render(right, prec, op)}"
    needs = prec < parent_prec or (right_of in ("-", "/") and prec == parent_prec)
    return f"({text})" if needs else text


class CountdownTask(ProceduralTask):
    name = "countdown"
    has_expert_solutions = True
    """Every problem carries its solution (CalibRL / RL-PLUS can train on it)."""
    salt = "tether-cd-v1"
    reward_ref = RewardRef("countdown", None, trusted=True)
    """tether's own bounded verifier (it reads this task's ``ops``): called in the trainer's process."""

    def __init__(self, config: CountdownConfig | None = None) -> None:
        self.config = config or CountdownConfig()
        self.heldout_fraction = self.config.heldout_fraction
        self.eval_size = self.config.eval_size

    def _tree(self, rng: random.Random, numbers: list[int]):
        """A random tree over ``numbers`` (each used once) whose partial results are positive
        integers, with its value; None if the allowed operators cannot combine two subtrees."""
        if len(numbers) == 1:
            return numbers[0], numbers[0]
        k = rng.randint(1, len(numbers) - 1)
        left = self._tree(rng, numbers[:k])
        right = self._tree(rng, numbers[k:])
        if left is None or right is None:
            return None
        (ln, lv), (rn, rv) = left, right
        valid = [op for op in self.config.ops
                 if op in "+*" or (op == "-" and lv > rv) or (op == "/" and lv % rv == 0)]
        if not valid:
            return None
        op = rng.choice(valid)
        value = lv + rv if op == "+" else lv - rv if op == "-" else lv * rv if op == "*" else lv // rv
        return (op, ln, rn), value

    def draw(self, rng: random.Random) -> tuple[str, Example]:
        c = self.config
        for _ in range(10_000):
            numbers = [rng.randint(c.min_number, c.max_number) for _ in range(c.n_numbers)]
            order = numbers[:]
            rng.shuffle(order)
            built = self._tree(rng, order)
            if built is None or not c.min_target <= built[1] <= c.max_target:
                continue
            node, target = built
            key = f"{','.join(map(str, sorted(numbers)))}->{target}"
            prompt = f"make {target} from {','.join(map(str, numbers))}:"
            return key, Example(prompt=prompt, answer=countdown_answer(target, numbers), solution=render(node))
        raise ValueError(
            f"countdown: no target in [{c.min_target}, {c.max_target}] reached in 10000 draws; "
            "widen CountdownConfig.min_target/max_target or change the number range"
        )

    def reward(self, prompt: str, completion: str, answer: str) -> float:
        try:
            target, numbers = parse_countdown_answer(answer)
        except ValueError:
            return 0.0
        return 1.0 if check_expression(first_line(completion), numbers, target, self.config.ops) is None else 0.0
