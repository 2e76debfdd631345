"""``tether tasks``: listing, showing a built-in task, checking a dataset file."""

import pytest

from tether.cli import main

pytestmark = pytest.mark.unit


def test_tasks_command_lists_shows_and_checks(tmp_path, capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert "arithmetic" in out and "countdown" in out and "max_digits=2" in out

    assert main(["tasks", "countdown", "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert "task countdown: 200 evaluation examples" in out and out.count("[train]") == 2

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "", "answer": "1"}\n')
    assert main(["tasks", str(data)]) == 2
    assert f"{data}: line 2: field 'prompt': empty prompt" in capsys.readouterr().err
    assert main(["tasks", str(data), "--skip-bad-rows"]) == 2  # the one good row ("a") hashes into eval
    assert "no training rows (2 rows read, 1 skipped, 1 held out for evaluation)" in capsys.readouterr().err
    data.write_text("".join(f'{{"prompt": "q{i}", "answer": "{i}"}}\n' for i in range(60)) + '{"prompt": 3, "answer": "1"}\n')
    assert main(["tasks", str(data), "--skip-bad-rows", "--reward", "numeric"]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 bad rows: {'wrong_type': 1}" in out and f"{data}: line 61: field 'prompt'" in out
    assert main(["tasks", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
