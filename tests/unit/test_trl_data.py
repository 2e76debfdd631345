"""TRL dataset formats (prompt-only, prompt-completion, conversational) from JSONL, CSV, Parquet and
in-memory datasets; TRL-convention reward functions; math-verify; row errors naming source/row/field."""

from __future__ import annotations

import json
import random
import sys

import pytest

from tether.tasks.registry import get_task
from tether.tasks.rewards import load_reward_fn, score
from tether.tasks.trl_data import RowError, TRLDatasetTask, encode_prompt, is_trl_reward, register_dataset

pytestmark = pytest.mark.unit

ROWS = [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(40)]


def trl_reward(prompts, completions, answer, **kwargs):
    """TRL convention: batched, dataset columns as keyword lists."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 if t.strip() == a else 0.0 for t, a in zip(texts, answer)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompt_only_jsonl_with_tether_reward(tmp_path):
    task = get_task(str(write_jsonl(tmp_path / "d.jsonl", [{"prompt": r["prompt"]} for r in ROWS])),
                    reward="tests.unit.test_trl_data:trl_reward_prompt_only")
    assert isinstance(task, TRLDatasetTask) and task.trl_convention
    ex = task.sample(random.Random(0))
    assert ex.messages is None and ex.answer == ""
    assert score(task.reward_for(ex), ex.prompt, "yes", ex.answer).reward == 1.0
    assert score(task.reward_for(ex), ex.prompt, "no", ex.answer).reward == 0.0


def trl_reward_prompt_only(prompts, completions, **kwargs):
    assert isinstance(prompts[0], str) and set(kwargs) == set()
    return [float(c == "yes") for c in completions]


def test_conversational_prompt_completion_and_trl_reward_get_columns(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}], "completion": [
        {"role": "assistant", "content": r["answer"]}], "answer": r["answer"], "level": i % 3}
        for i, r in enumerate(ROWS)]
    seen = {}

    def reward(prompts, completions, answer, level):
        seen.update(prompts=prompts, completions=completions, answer=answer, level=level)
        return [1.0 if completions[0][0]["content"] == answer[0] else 0.0]

    task = TRLDatasetTask(rows, reward=reward)
    ex = task.train_examples()[0]
    assert ex.messages == ({"role": "user", "content": ex.prompt},) and ex.solution == ex.answer
    assert score(task.reward_for(ex), ex.prompt, ex.answer, ex.answer).reward == 1.0
    assert seen["prompts"] == [list(ex.messages)] and seen["level"] == [ex.fields["level"]]
    assert seen["completions"] == [[{"role": "assistant", "content": ex.answer}]]


def test_messages_format_splits_last_assistant_turn():
    rows = [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": f"q{i}"},
                          {"role": "assistant", "content": f"a{i}"}], "answer": f"a{i}"} for i in range(30)]
    task = TRLDatasetTask(rows, reward="exact_match", eval_fraction=0)
    ex = task.train_examples()[3]
    assert [m["role"] for m in ex.messages] == ["system", "user"] and ex.solution == ex.answer == "a3"


def test_parquet_and_csv_and_in_memory_dataset(tmp_path, monkeypatch):
    import tether.tasks.registry as registry

    monkeypatch.setattr(registry, "BUILTIN_TASKS", dict(registry.BUILTIN_TASKS))  # register_dataset is global
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    task = get_task(str(tmp_path / "d.parquet"), reward="numeric")
    assert isinstance(task, TRLDatasetTask)
    assert len(task.train_examples()) + len(task.eval_examples()) == len(ROWS)
    assert task.reward("", "so 4", "4") == 1.0
    (tmp_path / "d.csv").write_text("prompt,answer\n" + "".join(f"{r['prompt']},{r['answer']}\n" for r in ROWS))
    csv_task = get_task(str(tmp_path / "d.csv"), reward="tests.unit.test_trl_data:trl_reward")
    assert isinstance(csv_task, TRLDatasetTask) and csv_task.trl_convention
    datasets = pytest.importorskip("datasets")
    register_dataset("adds-test", datasets.Dataset.from_list(ROWS), reward=trl_reward)
    mem = get_task("adds-test", eval_size=2)
    assert len(mem.eval_examples()) <= 2
    ex = mem.train_examples()[0]
    assert score(mem.reward_for(ex), ex.prompt, ex.answer, ex.answer).reward == 1.0


@pytest.mark.parametrize("row,field,message", [
    ({"question": "x"}, "prompt", "missing"),
    ({"prompt": ""}, "prompt", "empty prompt"),
    ({"prompt": [{"role": "user"}]}, "prompt", "not a {role, content}"),
    ({"prompt": [{"role": "wizard", "content": "x"}]}, "prompt", "role must be one of"),
    ({"prompt": "x", "completion": [{"role": "assistant", "content": 3}]}, "completion", "content a string"),
    ({"messages": [{"role": "user", "content": "x"}]}, "messages", "must end with an assistant turn"),
    ({"prompt": "x", "answer": [1]}, "answer", "expected a string or a number"),
])
def test_malformed_row_names_source_row_and_field(tmp_path, row, field, message):
    rows = ROWS[:3] + [row] + ROWS[3:]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(RowError) as e:
        TRLDatasetTask(str(path), reward=trl_reward)
    assert str(e.value).startswith(f"{path}: row 4: field '{field}': ") and message in str(e.value)


def test_missing_answer_for_tether_reward():
    with pytest.raises(RowError, match=r"<list>: row 1: field 'answer': missing"):
        TRLDatasetTask([{"prompt": "x"}], reward="exact_match")


def test_bad_parquet_names_file_and_row(tmp_path):
    pytest.importorskip("pyarrow.parquet")  # the parquet extra; a `dev`-only install skips this
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(RowError, match=r"bad.parquet: row 1: unreadable Parquet"):
        TRLDatasetTask(str(tmp_path / "bad.parquet"), reward=trl_reward)


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    """What a `dev`-only install sees (simulated: importing pyarrow fails)."""
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "d.parquet").write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"d.parquet: reading Parquet needs pyarrow: pip install 'tether\[parquet\]'"):
        TRLDatasetTask(str(tmp_path / "d.parquet"), reward=trl_reward)


def test_trl_reward_detection_and_wrong_return():
    assert is_trl_reward(trl_reward) and not is_trl_reward(load_reward_fn("exact_match"))
    task = TRLDatasetTask(ROWS, reward=lambda prompts, completions, **kw: [1.0, 2.0], eval_fraction=0)
    result = score(task.reward_for(task.train_examples()[0]), "p", "c", "a")
    assert result.failed and "one value per completion" in result.reason


def test_encode_prompt_conversational_needs_chat_tokenizer():
    from tether.models.tokenizer import CharTokenizer

    task = TRLDatasetTask([{"prompt": [{"role": "user", "content": "1+1="}], "answer": "2"}] * 3,
                          reward="exact_match", eval_fraction=0)
    with pytest.raises(ValueError, match="chat template"):
        encode_prompt(CharTokenizer(), task.train_examples()[0])
    assert encode_prompt(CharTokenizer(), TRLDatasetTask(ROWS, eval_fraction=0).train_examples()[0])


def test_math_verify_reward():
    pytest.importorskip("math_verify")
    fn = load_reward_fn("math_verify")
    assert fn("", "The answer is $\\frac{1}{2}$", "0.5") == 1.0
    assert fn("", "The answer is 3", "0.5") == 0.0
    # runs in score's worker thread (no signal-based timeouts inside)
    assert score(fn, "", "so x = 19", "19", timeout_s=5).reward == 1.0


def test_skip_bad_rows_counts_every_bad_row_and_keeps_the_rest(tmp_path):
    path = tmp_path / "mixed.jsonl"
    good = "".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n" for r in ROWS)
    bad = [json.dumps({"prompt": ""}), "{not json", json.dumps({"question": "x"}), json.dumps({"prompt": "1+1=", "answer": [2]})]
    path.write_text(good + "\n".join(bad) + "\n")
    with pytest.raises(RowError, match=r"mixed.jsonl: row 41: field 'prompt': empty prompt"):
        get_task(str(path), format="trl")
    task = get_task(str(path), format="trl", skip_bad_rows=True)
    assert task.n_skipped == 4 and [e.kind for e in task.skipped] == ["empty_prompt", task.skipped[1].kind,
                                                                       "missing_field", "wrong_type"]
    assert "line 42" in str(task.skipped[1]) or "row 42" in str(task.skipped[1])
    assert len(task.train_examples()) + len(task.eval_examples()) == len(ROWS)
