"""Bad text in dataset rows (issue 13, item 12): a character the built-in tokenizer cannot encode (a tab,
an accented letter), a lone surrogate, a NUL byte. ``tether tasks FILE`` names file, line and field;
``--skip-bad-rows`` skips and counts them; a run's task never hands them to training."""

import json

import pytest

from tether.cli import main

pytestmark = pytest.mark.unit

BAD_ROWS = [
    ({"prompt": "1\t+1=", "answer": "2"}, "prompt", "character '\\t' (U+0009) at position 1 is not in the built-in"),
    ({"prompt": "1+1=", "answer": "d\u00e9ux"}, "answer", "character 'é' (U+00E9) at position 1"),
    ({"prompt": "1+\ud800=", "answer": "2"}, "prompt", "contains a lone surrogate U+D800 at position 2"),
    ({"prompt": "1+1=", "answer": "2", "solution": "2\u0000"}, "solution", "contains a NUL byte at position 1"),
]


def _write(path, bad_rows):
    good = [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(60)]
    path.write_text("".join(json.dumps(r) + "\n" for r in good[:2] + bad_rows + good[2:]))  # bad rows from line 3


@pytest.mark.parametrize("row, field, detail", BAD_ROWS)
def test_tasks_names_file_line_and_field_of_bad_text(tmp_path, capsys, row, field, detail):
    data = tmp_path / "d.jsonl"
    _write(data, [row])
    assert main(["tasks", str(data)]) == 2
    err = capsys.readouterr().err
    assert f"{data}: line 3: field '{field}': {detail}" in err


def test_skip_bad_rows_skips_and_counts_bad_text(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    _write(data, [r for r, _, _ in BAD_ROWS])
    assert main(["tasks", str(data), "--skip-bad-rows"]) == 0
    assert "skipped 4 bad rows: {'unencodable': 2, 'bad_text': 2}" in capsys.readouterr().out


def test_another_models_tokenizer_is_not_held_to_the_builtin_vocabulary(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    _write(data, [r for r, _, _ in BAD_ROWS])
    assert main(["tasks", str(data), "--skip-bad-rows", "--model", "some/hf-model"]) == 0
    assert "skipped 2 bad rows: {'bad_text': 2}" in capsys.readouterr().out


def test_text_problem_accepts_any_valid_text():
    from tether.tasks.text import text_problem

    assert text_problem("tab\there, é, 中文, emoji \U0001F600") is None
    assert text_problem("\udfff") == "contains a lone surrogate U+DFFF at position 0 (not valid Unicode text)"
