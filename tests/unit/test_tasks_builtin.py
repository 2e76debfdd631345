"""Built-in procedural tasks: correctness of answers, solvability, safe verification, held-out split."""

import random
import re
from collections import Counter
from fractions import Fraction

import pytest

from tether.tasks.arithmetic import ArithmeticConfig, ArithmeticTask, problem_key
from tether.tasks.countdown import (
    CountdownConfig,
    CountdownTask,
    ExpressionError,
    check_expression,
    countdown_answer,
    countdown_reward,
    evaluate,
    parse_expression,
    render,
)

pytestmark = pytest.mark.unit


# ------------------------------------------------------------------------------ reference helpers


def reference_eval(text: str) -> Fraction:
    """Obviously-correct reference: shunting-yard to RPN over + - * / and parentheses with Fractions."""
    tokens = re.findall(r"\d+|[-+*/()]", text)
    assert "".join(tokens) == text.replace(" ", ""), text
    prec = {"+": 1, "-": 1, "*": 2, "/": 2}
    out, stack = [], []
    for tok in tokens:
        if tok.isdigit():
            out.append(Fraction(int(tok)))
        elif tok == "(":
            stack.append(tok)
        elif tok == ")":
            while stack[-1] != "(":
                out.append(stack.pop())
            stack.pop()
        else:
            while stack and stack[-1] != "(" and prec[stack[-1]] >= prec[tok]:
                out.append(stack.pop())
            stack.append(tok)
    out.extend(reversed(stack))
    vals = []
    for item in out:
        if isinstance(item, Fraction):
            vals.append(item)
        else:
            b, a = vals.pop(), vals.pop()
            vals.append(a + b if item == "+" else a - b if item == "-" else a * b if item == "*" else a / b)
    (v,) = vals
    return v


def arithmetic_reference(prompt: str) -> int:
    m = re.fullmatch(r"(\d+)([-+*])(\d+)=", prompt)
    assert m, prompt
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    return {"+": a + b, "-": a - b, "*": a * b}[op]


# ------------------------------------------------------------------------------------- arithmetic


def test_arithmetic_answers_digits_and_ops_follow_the_config():
    cfg = ArithmeticConfig(min_digits=2, max_digits=3, ops=("+", "-"))
    task = ArithmeticTask(cfg)
    rng = random.Random(1)
    ops_seen = Counter()
    for _ in range(2000):
        ex = task.sample(rng)
        a, op, b = re.fullmatch(r"(\d+)([-+*])(\d+)=", ex.prompt).groups()
        assert 2 <= len(a) <= 3 and 2 <= len(b) <= 3 and not a.startswith("0") and not b.startswith("0")
        assert ex.answer == str(arithmetic_reference(ex.prompt)) == ex.solution
        assert int(ex.answer) >= 0  # allow_negative=False
        assert ex.prompt.isascii() and ex.prompt.isprintable()
        ops_seen[op] += 1
    assert set(ops_seen) == {"+", "-"} and min(ops_seen.values()) > 800


def test_arithmetic_negative_answers_only_when_allowed():
    task = ArithmeticTask(ArithmeticConfig(ops="-", allow_negative=True))
    rng = random.Random(0)
    answers = [int(task.sample(rng).answer) for _ in range(500)]
    assert min(answers) < 0
    assert all(str(arithmetic_reference(e.prompt)) == e.answer for e in task.eval_examples())


def test_arithmetic_heldout_split_is_disjoint_from_training():
    task = ArithmeticTask(ArithmeticConfig(max_digits=2, eval_size=200))
    evals = task.eval_examples()
    assert len(evals) == 200
    eval_keys = {problem_key(*_split(e.prompt)) for e in evals}
    assert len(eval_keys) == 200  # distinct problems
    rng = random.Random(123)
    train_keys = set()
    for _ in range(20000):
        ex = task.sample(rng)
        train_keys.add(problem_key(*_split(ex.prompt)))
    assert not (train_keys & eval_keys)
    # the problem space is small enough that training covers most non-held-out problems
    assert len(train_keys) > 5000


def _split(prompt):
    a, op, b = re.fullmatch(r"(\d+)([-+*])(\d+)=", prompt).groups()
    return int(a), op, int(b)


def test_arithmetic_commutative_problems_share_a_split():
    task = ArithmeticTask()
    for a in range(100):
        for b in range(100):
            for op in "+*":
                assert task.is_heldout_key(problem_key(a, op, b)) == task.is_heldout_key(problem_key(b, op, a))
    assert problem_key(3, "-", 2) != problem_key(2, "-", 3)


def test_arithmetic_is_deterministic_for_a_seed_and_eval_split_is_fixed():
    t1, t2 = ArithmeticTask(), ArithmeticTask()
    r1, r2, r3 = random.Random(5), random.Random(5), random.Random(6)
    s1 = [t1.sample(r1) for _ in range(100)]
    s2 = [t2.sample(r2) for _ in range(100)]
    s3 = [t1.sample(r3) for _ in range(100)]
    assert s1 == s2 and s1 != s3
    assert t1.eval_examples() == t2.eval_examples()
    assert ArithmeticTask(ArithmeticConfig(eval_size=50)).eval_examples() == t1.eval_examples()[:50]


def test_arithmetic_reward_is_exact_match_of_the_first_line():
    task = ArithmeticTask()
    assert task.reward("12+7=", "19", "19") == 1.0
    assert task.reward("12+7=", " 19 \nmore text", "19") == 1.0
    for wrong in ("190", "1 9", "", "18", "19.0", "+19"):
        assert task.reward("12+7=", wrong, "19") == 0.0


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(min_digits=0), "min_digits"),
        (dict(min_digits=3, max_digits=2), "max_digits"),
        (dict(ops=("/",)), "ops"),
        (dict(ops=()), "ops"),
        (dict(ops="++"), "ops"),
        (dict(eval_size=0), "eval_size"),
        (dict(heldout_fraction=0.0), "heldout_fraction"),
        (dict(min_digits=1, max_digits=1, ops="+"), "eval_size"),
    ],
)
def test_arithmetic_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"ArithmeticConfig.{field}"):
        ArithmeticConfig(**kwargs)


# -------------------------------------------------------------------------------------- countdown


def test_countdown_parser_matches_reference_on_random_expressions():
    rng = random.Random(0)
    for _ in range(3000):
        def gen(depth):
            if depth == 0 or rng.random() < 0.3:
                return str(rng.randint(0, 30))
            text = f"{gen(depth - 1)}{rng.choice('+-*/')}{gen(depth - 1)}"
            return f"({text})" if rng.random() < 0.4 else text
        text = gen(4)
        try:
            want = reference_eval(text)
        except ZeroDivisionError:
            with pytest.raises(ExpressionError, match="division by zero"):
                evaluate(parse_expression(text))
            continue
        assert evaluate(parse_expression(text)) == want, text


def test_countdown_instances_are_solvable_and_solutions_verify():
    for cfg in (CountdownConfig(), CountdownConfig(n_numbers=5, max_number=50, max_target=500),
                CountdownConfig(n_numbers=2, ops="+*")):
        task = CountdownTask(cfg)
        rng = random.Random(3)
        for _ in range(500):
            ex = task.sample(rng)
            target, numbers = _prompt_parts(ex.prompt)
            assert ex.answer == countdown_answer(target, numbers)
            assert len(numbers) == cfg.n_numbers
            assert all(cfg.min_number <= n <= cfg.max_number for n in numbers)
            assert cfg.min_target <= target <= cfg.max_target
            # independent check: the solution uses exactly the given numbers and reaches the target
            assert sorted(map(int, re.findall(r"\d+", ex.solution))) == sorted(numbers)
            assert set(re.findall(r"[-+*/]", ex.solution)) <= set(cfg.ops)
            assert reference_eval(ex.solution) == target
            assert task.reward(ex.prompt, ex.solution, ex.answer) == 1.0
            assert countdown_reward(ex.prompt, ex.solution, ex.answer) == 1.0


def _prompt_parts(prompt):
    m = re.fullmatch(r"make (\d+) from (\d+(?:,\d+)*):", prompt)
    assert m, prompt
    return int(m.group(1)), [int(x) for x in m.group(2).split(",")]


def test_countdown_render_rebuilds_the_same_value():
    rng = random.Random(2)
    task = CountdownTask(CountdownConfig(n_numbers=6, max_number=9, max_target=10**6))
    for _ in range(300):
        numbers = [rng.randint(1, 9) for _ in range(6)]
        built = task._tree(rng, numbers)
        if built is None:
            continue
        node, value = built
        assert evaluate(parse_expression(render(node))) == value


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("2*5", 1.0),
        ("5*2", 1.0),
        (" (7 + 5 - 2) \nextra", 1.0),
        ("(7-2)*2", 0.0),  # reuse of 2
        ("7+5-2", 1.0),  # uses all three
        ("10", 0.0),  # 10 is not a given number
        ("5+5", 0.0),  # reuse of 5
        ("2*5*1", 0.0),  # 1 not given
        ("7+2", 0.0),  # wrong value
        ("7*2/0", 0.0),  # 0 not given (and division by zero)
        ("", 0.0),
        ("hello", 0.0),
        ("2*5=10", 0.0),
        ("-2*-5", 0.0),  # unary minus not in the grammar
        ("2**5", 0.0),
        ("(2*5", 0.0),
        ("2*5)", 0.0),
        ("2 5", 0.0),
        ("2.0*5", 0.0),
        ("02*5", 0.0),
    ],
)
def test_countdown_reward_cases(completion, expected):
    answer = countdown_answer(10, [2, 5, 7])
    assert countdown_reward("make 10 from 2,5,7:", completion, answer) == expected


def test_countdown_division_by_zero_and_exactness():
    assert check_expression("2/(5-5)", [2, 5, 5], 1) == "evaluate: division by zero"
    assert countdown_reward("", "2/(5-5)", countdown_answer(1, [2, 5, 5])) == 0.0
    # exact rational arithmetic: 1/3*3 is exactly 1 (floats would also pass here; 7/3*3 too)
    assert check_expression("7/3*3", [7, 3, 3], 7) is None
    assert check_expression("1/3+1/3+1/3", [1, 3, 1, 3, 1, 3], 1) is None
    assert check_expression("10/4", [10, 4], 2) is not None  # 5/2, not 2


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os')",
        "__import__('os').system('echo pwned')",
        "2+2;import os",
        "lambda: 1",
        "open('/etc/passwd')",
        "1e9",
        "9**9**9",
        "0x10",
        "[1, 2]",
        "2^5",
        "1_000",
        "(" * 100 + "1" + ")" * 100,
        "1+" * 200 + "1",
        "9" * 20,
        "\u0661+1",  # Arabic-Indic digit: not ASCII
    ],
)
def test_countdown_parser_rejects_malicious_and_huge_inputs(text):
    with pytest.raises(ExpressionError):
        parse_expression(text)
    assert check_expression(text, [1, 2, 9, 10], 3).startswith("parse: ")
    assert countdown_reward("", text, countdown_answer(3, [1, 2])) == 0.0


def test_countdown_respects_allowed_operators_and_bad_answers():
    task = CountdownTask(CountdownConfig(ops="+-"))
    answer = countdown_answer(10, [2, 5, 3])
    assert task.reward("", "5+3+2", answer) == 1.0
    assert task.reward("", "2*5", answer) == 0.0
    assert task.reward("", "2*5", "not an answer") == 0.0
    with pytest.raises(ValueError, match="31\\|3,7,25,2"):
        countdown_reward("", "2*5", "garbage")


def test_countdown_heldout_split_and_determinism():
    task = CountdownTask()
    evals = task.eval_examples()
    assert len(evals) == 200

    def key(ex):
        target, numbers = _prompt_parts(ex.prompt)
        return tuple(sorted(numbers)), target

    eval_keys = {key(e) for e in evals}
    assert len(eval_keys) == 200
    rng = random.Random(9)
    train = [task.sample(rng) for _ in range(5000)]
    assert not ({key(e) for e in train} & eval_keys)
    rng2 = random.Random(9)
    assert [task.sample(rng2) for _ in range(5000)] == train
    assert CountdownTask().eval_examples() == evals


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(n_numbers=1), "n_numbers"),
        (dict(min_number=0), "min_number"),
        (dict(min_number=5, max_number=4), "max_number"),
        (dict(min_target=0), "min_target"),
        (dict(min_target=10, max_target=5), "max_target"),
        (dict(ops="+%"), "ops"),
        (dict(heldout_fraction=0.9), "heldout_fraction"),
    ],
)
def test_countdown_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"CountdownConfig.{field}"):
        CountdownConfig(**kwargs)


def test_default_builtin_tasks_fit_a_character_level_model():
    """The built-in model is character-level over printable ASCII with a ~256 context: default
    prompts plus solutions must be printable ASCII and short."""
    for task in (ArithmeticTask(), CountdownTask(), CountdownTask(CountdownConfig(n_numbers=6, max_number=999,
                                                                                  max_target=10**5))):
        rng = random.Random(0)
        examples = task.eval_examples() + [task.sample(rng) for _ in range(500)]
        for ex in examples:
            text = ex.prompt + ex.solution
            assert text.isascii() and text.isprintable()
            assert len(text) < 96
        assert task.n_skipped == 0 and task.skipped_by_reason == {}
