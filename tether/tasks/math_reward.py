"""``math_verify``: a built-in reward for math answers through Hugging Face's ``math-verify``
(LaTeX / expression parsing and symbolic equivalence), used when that package is installed
(``pip install 'tether[math]'``).

Reward 1.0 iff ``verify(parse(answer), parse(completion))``; 0.0 otherwise. Parsing and verification
run without math-verify's signal-based timeouts (they only work in the main thread); the trainer runs
this reward in worker processes (it parses with sympy, third-party code) under its own hard timeout,
``reward_timeout_s``.
"""

from __future__ import annotations

import importlib.util

from tether.tasks.rewards import register_builtin_reward


def math_verify_reward(prompt: str, completion: str, answer: str) -> float:
    from math_verify import parse, verify

    gold = parse(answer, parsing_timeout=None)
    pred = parse(completion, parsing_timeout=None)
    return 1.0 if gold and pred and verify(gold, pred, timeout_seconds=None) else 0.0


def check_math_answer(answer: str) -> str | None:
    if importlib.util.find_spec("math_verify") is None:
        return "cannot be checked: the math_verify reward needs the math-verify package (pip install math-verify)"
    from math_verify import parse

    return None if parse(answer, parsing_timeout=None) else "is not a parseable math answer"


register_builtin_reward("math_verify", math_verify_reward, check_math_answer)
