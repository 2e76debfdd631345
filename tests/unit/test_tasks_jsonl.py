"""Dataset tasks: every bad-row kind names file, line and field; skipping counts; split; registry."""

import json
import logging
import random

import pytest

from tether.tasks import get_task, task_names
from tether.tasks.arithmetic import ArithmeticTask
from tether.tasks.base import Example
from tether.tasks.countdown import CountdownTask
from tether.tasks.jsonl import DatasetError, JsonlConfig, JsonlTask
from tether.tasks.split import is_heldout

pytestmark = pytest.mark.unit

GOOD = [
    '{"prompt": "1+1=", "answer": "2"}',
    "",  # blank lines are not rows but count as lines
    '{"prompt": "2+2=", "answer": 4, "solution": "4", "meta": {"x": 1}}',
]
BAD_LINE = 4  # the bad row comes right after GOOD


def write(path, lines, raw_tail: bytes = b""):
    path.write_bytes(("\n".join(lines) + "\n").encode() + raw_tail)
    return path


# (row text, kind, field, exact message after "<file>: line 4")
BAD_ROWS = [
    ('{"prompt": 5, "answer": "x"}', "wrong_type", "prompt", ": field 'prompt': expected a string, got number"),
    ('{"prompt": null, "answer": "x"}', "wrong_type", "prompt", ": field 'prompt': expected a string, got null"),
    ('{"prompt": "a", "answer": [1]}', "wrong_type", "answer",
     ": field 'answer': expected a string or a finite number, got array"),
    ('{"prompt": "a", "answer": true}', "wrong_type", "answer",
     ": field 'answer': expected a string or a finite number, got boolean"),
    ('{"prompt": "a", "answer": "1", "solution": 3}', "wrong_type", "solution",
     ": field 'solution': expected a string or null, got number"),
    ('{"answer": "1"}', "missing_field", "prompt", ": field 'prompt': missing (the row has ['answer'])"),
    ('{"prompt": "a"}', "missing_field", "answer", ": field 'answer': missing (the row has ['prompt'])"),
    ('{"prompt": "  \\n ", "answer": "1"}', "empty_prompt", "prompt", ": field 'prompt': empty prompt"),
    ('{"prompt": "a", "answer": " "}', "empty_answer", "answer", ": field 'answer': empty answer"),
    ('{"prompt": "' + "x" * 33 + '", "answer": "1"}', "prompt_too_long", "prompt",
     ": field 'prompt': 33 characters, more than max_prompt_chars=32"),
    ("[1, 2]", "not_object", None, ": expected a JSON object, got array"),
    ('"just a string"', "not_object", None, ": expected a JSON object, got string"),
    ('{"prompt": "a", "answer": NaN}', "invalid_json", None, ": invalid JSON: NaN is not valid JSON"),
    ('{"prompt": "a", "answer": }', "invalid_json", None, ": invalid JSON: Expecting value at column 27"),
    ('{"prompt": "a", "answer": "1"', "invalid_json", None,
     ": invalid JSON: Expecting ',' delimiter at column 30"),
]


@pytest.mark.parametrize("row, kind, field, message", BAD_ROWS, ids=[f"{k}-{i}" for i, (_, k, _, _) in enumerate(BAD_ROWS)])
def test_each_bad_row_names_file_line_and_field(tmp_path, row, kind, field, message):
    path = write(tmp_path / "data.jsonl", GOOD + [row, '{"prompt": "3+3=", "answer": "6"}'])
    with pytest.raises(DatasetError) as info:
        JsonlTask(JsonlConfig(path=str(path), max_prompt_chars=32, eval_fraction=0))
    e = info.value
    assert str(e) == f"{path}: line {BAD_LINE}{message}"
    assert (e.path, e.line, e.field, e.kind) == (str(path), BAD_LINE, field, kind)


def test_invalid_utf8_and_bad_answer_rows(tmp_path):
    path = write(tmp_path / "d.jsonl", GOOD, raw_tail=b'{"prompt": "\xff", "answer": "1"}\n')
    with pytest.raises(DatasetError) as info:
        JsonlTask(str(path), eval_fraction=0)
    assert str(info.value) == f"{path}: line 4: not valid UTF-8 (byte 13 of the line)"
    assert info.value.kind == "invalid_utf8"

    path = write(tmp_path / "n.jsonl", GOOD + ['{"prompt": "q", "answer": "seven"}'])
    with pytest.raises(DatasetError) as info:
        JsonlTask(str(path), reward="numeric", eval_fraction=0)
    assert str(info.value) == (f"{path}: line 4: field 'answer': 'seven' is not usable by reward 'numeric': "
                               "contains no number (needed by the numeric reward)")
    # the same row is fine for exact_match
    assert len(JsonlTask(str(path), eval_fraction=0).train_examples()) == 3


def test_skip_bad_rows_counts_every_kind_and_keeps_every_good_row(tmp_path, caplog):
    lines = list(GOOD)
    good_prompts = ["1+1=", "2+2="]
    for row, *_ in BAD_ROWS:
        good_prompts.append(f"ok {len(lines)}")
        lines += [row, json.dumps({"prompt": good_prompts[-1], "answer": "fine"})]
    path = write(tmp_path / "mixed.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="tether.tasks.jsonl"):
        task = JsonlTask(JsonlConfig(path=str(path), max_prompt_chars=32, eval_fraction=0, skip_bad_rows=True))
    want_kinds = {}
    for _, kind, _, _ in BAD_ROWS:
        want_kinds[kind] = want_kinds.get(kind, 0) + 1
    assert task.n_skipped == len(BAD_ROWS)
    assert task.skipped_by_reason == want_kinds
    assert [e.line for e in task.skipped] == [4 + 2 * i for i in range(len(BAD_ROWS))]
    assert [e.prompt for e in task.train_examples()] == good_prompts
    assert task.n_rows == 2 + 2 * len(BAD_ROWS)
    assert any(f"skipped {len(BAD_ROWS)} bad rows" in r.message for r in caplog.records)


def test_answers_solutions_and_numbers(tmp_path):
    path = write(tmp_path / "d.jsonl", ['{"prompt": "a", "answer": 4}', '{"prompt": "b", "answer": 0.5, "solution": null}',
                                        '{"prompt": "c", "answer": "x", "solution": "because x"}'])
    task = JsonlTask(str(path), eval_fraction=0)
    assert task.train_examples() == [Example("a", "4"), Example("b", "0.5"), Example("c", "x", "because x")]
    assert task.name == "d"
    assert task.reward("c", "x", "x") == 1.0


def test_split_is_by_prompt_hash_deterministic_and_order_independent(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(400)]
    rows += [{"prompt": "q7", "answer": "7 again"}]  # a duplicate prompt stays with its twin
    path = write(tmp_path / "a.jsonl", [json.dumps(r) for r in rows])
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    path2 = write(tmp_path / "b.jsonl", [json.dumps(r) for r in shuffled])
    t1, t2 = JsonlTask(str(path), eval_fraction=0.2), JsonlTask(str(path2), eval_fraction=0.2)
    eval1 = {e.prompt for e in t1.eval_examples()}
    train1 = {e.prompt for e in t1.train_examples()}
    assert eval1 == {e.prompt for e in t2.eval_examples()}
    assert not eval1 & train1 and eval1 | train1 == {r["prompt"] for r in rows}
    assert 40 < len(eval1) < 120  # about 20 % of 400
    assert eval1 == {r["prompt"] for r in rows if is_heldout(r["prompt"], 0.2, "tether-jsonl-v1")}
    assert len(t1.eval_examples()) + len(t1.train_examples()) == len(rows)
    # sampling is from the training rows and deterministic for a seed
    r1, r2 = random.Random(3), random.Random(3)
    s1 = [t1.sample(r1) for _ in range(200)]
    assert s1 == [t1.sample(r2) for _ in range(200)]
    assert all(e.prompt in train1 for e in s1)
    assert len(JsonlTask(str(path), eval_fraction=0.2, eval_size=10).eval_examples()) == 10


def test_eval_file_and_empty_splits(tmp_path):
    train = write(tmp_path / "train.jsonl", ['{"prompt": "a", "answer": "1"}', '{"prompt": "b", "answer": "2"}'])
    ev = write(tmp_path / "eval.jsonl", ['{"prompt": "c", "answer": "3"}', '{"prompt": 1, "answer": "3"}'])
    with pytest.raises(DatasetError, match=f"{ev}: line 2: field 'prompt'"):
        JsonlTask(str(train), eval_path=str(ev))
    task = JsonlTask(str(train), eval_path=str(ev), skip_bad_rows=True)
    assert [e.prompt for e in task.train_examples()] == ["a", "b"]
    assert [e.prompt for e in task.eval_examples()] == ["c"]
    assert task.n_skipped == 1
    with pytest.raises(ValueError, match="no evaluation rows"):
        JsonlTask(str(train), eval_fraction=0.01)
    only_bad = write(tmp_path / "bad.jsonl", ['{"prompt": ""}'])
    with pytest.raises(ValueError, match="no training rows"):
        JsonlTask(str(only_bad), skip_bad_rows=True, eval_fraction=0)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        JsonlTask(str(tmp_path / "nope.jsonl"))


def test_csv_rows_with_physical_line_numbers(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,answer,solution\n"multi\nline prompt",1,\nq2,2,sol\n,3,\nq4,4,x,extra\nq5\n')
    with pytest.raises(DatasetError) as info:
        JsonlTask(str(path), eval_fraction=0)
    assert str(info.value) == f"{path}: line 5: field 'prompt': empty prompt"
    task = JsonlTask(str(path), eval_fraction=0, skip_bad_rows=True)
    assert task.train_examples() == [Example("multi\nline prompt", "1"), Example("q2", "2", "sol")]
    assert [(e.line, e.kind, e.field) for e in task.skipped] == [
        (5, "empty_prompt", "prompt"), (6, "bad_columns", None), (7, "missing_field", "answer")]


def test_reward_spec_from_a_file(tmp_path):
    rf = tmp_path / "rw.py"
    rf.write_text("def contains(prompt, completion, answer):\n    return float(answer in completion)\n")
    path = write(tmp_path / "d.jsonl", ['{"prompt": "a", "answer": "yes"}'])
    task = JsonlTask(str(path), reward=f"{rf}:contains", eval_fraction=0)
    assert task.reward("a", "oh yes indeed", "yes") == 1.0
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        JsonlTask(str(path), reward=f"{rf}:missing", eval_fraction=0)


@pytest.mark.parametrize(
    "kwargs, field",
    [(dict(max_prompt_chars=0), "max_prompt_chars"), (dict(eval_fraction=1.0), "eval_fraction"),
     (dict(eval_size=0), "eval_size"), (dict(reward=""), "reward")],
)
def test_jsonl_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"JsonlConfig.{field}"):
        JsonlConfig(path="x.jsonl", **kwargs)


# -------------------------------------------------------------------------------------- registry


def test_registry_builtins_options_and_paths(tmp_path):
    assert task_names() == ["arithmetic", "countdown"]
    t = get_task("arithmetic", max_digits=3, ops="+", reward=None)
    assert isinstance(t, ArithmeticTask) and t.config.max_digits == 3 and t.config.ops == ("+",)
    assert isinstance(get_task("countdown", n_numbers=4), CountdownTask)
    path = write(tmp_path / "d.jsonl", ['{"prompt": "a", "answer": "1"}'])
    j = get_task(str(path), reward="exact_match", eval_fraction=0, skip_bad_rows=True)
    assert isinstance(j, JsonlTask) and j.config.skip_bad_rows
    with pytest.raises(ValueError, match="unknown task 'arith': built-in tasks are arithmetic, countdown"):
        get_task("arith")
    with pytest.raises(ValueError, match="unknown option.* digits; valid options: min_digits, max_digits"):
        get_task("arithmetic", digits=3)
    with pytest.raises(ValueError, match="unknown option.* n_numbers; valid options: path, reward"):
        get_task(str(path), n_numbers=3)
    with pytest.raises(FileNotFoundError):
        get_task(str(tmp_path / "missing.jsonl"))
    txt = tmp_path / "data.txt"
    txt.write_text("x")
    with pytest.raises(ValueError, match="unsupported dataset format '.txt'; supported: .csv, .jsonl"):
        get_task(str(txt))
