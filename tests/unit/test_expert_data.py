"""The expert-solution column (`expert` or `solution`) in JSONL, CSV, Parquet and TRL-format datasets."""

from __future__ import annotations

import json

import pytest

from tether.commands.tasks import expert_report
from tether.tasks.jsonl import DatasetError, JsonlTask
from tether.tasks.registry import get_task
from tether.tasks.trl_data import RowError, TRLDatasetTask

pytestmark = pytest.mark.unit


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def rows(n=20, **extra):
    return [{"prompt": f"{i}+1=", "answer": str(i + 1), **{k: v(i) for k, v in extra.items()}} for i in range(n)]


def solutions(task):
    return {ex.prompt: ex.solution for ex in task.train_examples()}


def test_jsonl_expert_or_solution_column_and_the_expert_column_wins(tmp_path):
    data = rows(solution=lambda i: f"s{i}")
    data[3]["expert"] = "e3"  # both: expert wins
    data[4] = {"prompt": "4+1=", "answer": "5", "expert": "e4"}  # expert only
    data[5]["solution"] = None  # null: no solution
    task = JsonlTask(write_jsonl(tmp_path / "d.jsonl", data), eval_fraction=0.0)
    got = solutions(task)
    assert got["3+1="] == "e3" and got["4+1="] == "e4" and got["5+1="] is None and got["6+1="] == "s6"
    assert task.n_expert_solutions == 19 and not task.has_expert_solutions
    full = JsonlTask(write_jsonl(tmp_path / "e.jsonl", rows(expert=lambda i: f"e{i}")), eval_fraction=0.0)
    assert full.n_expert_solutions == 20 and full.has_expert_solutions


@pytest.mark.parametrize("field", ["expert", "solution"])
@pytest.mark.parametrize("value,type_name", [(3, "number"), (["a"], "array"), (True, "boolean")])
def test_a_bad_expert_cell_names_file_line_and_field(tmp_path, field, value, type_name):
    data = rows()
    data[6][field] = value
    path = write_jsonl(tmp_path / "bad.jsonl", data)
    with pytest.raises(DatasetError) as e:
        JsonlTask(path)
    assert str(e.value) == f"{path}: line 7: field '{field}': expected a string or null, got {type_name}"
    task = JsonlTask(path, skip_bad_rows=True, eval_fraction=0.0)
    assert task.n_skipped == 1 and task.skipped_by_reason == {"wrong_type": 1}


def test_csv_empty_expert_cells_are_no_solution(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,answer,expert\n1+1=,2,2\n2+1=,3,\n")
    task = JsonlTask(str(path), eval_fraction=0.0)
    assert solutions(task) == {"1+1=": "2", "2+1=": None} and task.n_expert_solutions == 1


def test_trl_rows_expert_then_completion_then_solution(tmp_path):
    data = [
        {"prompt": "1+1=", "completion": "c", "solution": "s", "expert": "e", "answer": "2"},
        {"prompt": "2+1=", "completion": "c", "solution": "s", "answer": "3"},
        {"prompt": "3+1=", "solution": 4, "answer": "4"},  # a number is its text
        {"prompt": "4+1=", "solution": "", "answer": "5"},  # empty: none
        {"prompt": [{"role": "user", "content": "5+1="}], "expert": [{"role": "assistant", "content": "6"}],
         "answer": "6"},
    ]
    task = TRLDatasetTask(data, eval_fraction=0.0)
    assert solutions(task) == {"1+1=": "e", "2+1=": "c", "3+1=": "4", "4+1=": None, "5+1=": "6"}
    assert task.train_examples()[0].fields["expert"] == "e"  # still a column for TRL-convention rewards
    assert task.n_expert_solutions == 4 and not task.has_expert_solutions


@pytest.mark.parametrize("field,value,message", [
    ("expert", 3, "expected a string or a list of {role, content} messages, got int"),
    ("expert", [{"role": "assistant"}], "message 0 is not a {role, content} object"),
    ("solution", ["x"], "expected a string or a number, got list"),
])
def test_trl_bad_expert_cells_name_source_row_and_field(tmp_path, field, value, message):
    data = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+1=", "answer": "3", field: value}]
    with pytest.raises(RowError) as e:
        TRLDatasetTask(data, eval_fraction=0.0)
    assert str(e.value).startswith(f"<list>: row 2: field '{field}': ") and message in str(e.value)


def test_parquet_expert_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows(expert=lambda i: f"e{i}")), path)
    task = get_task(str(path), eval_fraction=0.0)
    assert isinstance(task, TRLDatasetTask) and task.has_expert_solutions
    assert solutions(task)["7+1="] == "e7"


def test_tether_tasks_reports_expert_solutions(tmp_path):
    some = JsonlTask(write_jsonl(tmp_path / "d.jsonl", rows(expert=lambda i: "x" if i % 2 else None)),
                     eval_fraction=0.0)
    assert expert_report(some) == ("expert solutions: 10 of 20 training rows (calibrl, rl_plus need one on every "
                                   "training row)")
    full = JsonlTask(write_jsonl(tmp_path / "e.jsonl", rows(solution=lambda i: "x")), eval_fraction=0.0)
    assert expert_report(full) == "expert solutions: 20 of 20 training rows (calibrl, rl_plus can train)"
    assert expert_report(get_task("countdown")) == "expert solutions: every problem (calibrl, rl_plus can train)"
