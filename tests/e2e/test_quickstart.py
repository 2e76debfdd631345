"""docs/quickstart.md's tether script, run as written (the hub model replaced by a tiny one built here): a TRL
user's GRPO quickstart ported to ``tether.Trainer`` trains, and its state and run directory hold the steps."""

import re
from pathlib import Path

import pytest

from tests.doc_blocks import exec_block
from tests.engine.hf_helpers import tiny_llama_folder

pytestmark = pytest.mark.e2e
DOC = Path(__file__).resolve().parents[2] / "docs" / "quickstart.md"


def blocks() -> tuple[str, str]:
    text = DOC.read_text()
    trl, tether = re.findall(r"```python\n(.*?)```", text, re.S)[:2]
    assert "<!-- e2e: tests/e2e/test_quickstart.py runs this block -->\n```python\n" + tether in text
    return trl, tether


def test_the_port_takes_no_more_lines_than_the_trl_script():
    trl, tether = blocks()
    assert len(tether.strip().splitlines()) <= len(trl.strip().splitlines())


def test_the_documented_tether_script_trains(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    import torch

    torch.set_num_threads(1)
    folder = tiny_llama_folder(tmp_path / "model")
    scope = exec_block(blocks()[1], DOC, tmp_path, monkeypatch, {
        'MODEL = "Qwen/Qwen2.5-0.5B-Instruct"': f"MODEL = {str(folder)!r}",
        'objective="tis")': 'objective="tis", progress=False, threads=1, prompts_per_step=4)'})
    trainer = scope["trainer"]
    assert trainer.state.global_step == 2
    for row in trainer.state.log_history:  # the meter ran, and both rewards were scored and weighted
        assert "meter/total/ess_token" in row
        assert row["reward/mean"] == pytest.approx(0.2 * row["reward/reward_len/mean"]
                                                   + row["reward/reward_correct/mean"], abs=1e-5)
    assert (tmp_path / "tether-out" / "metrics.jsonl").read_text().count("\n") == 2
    assert trainer.args.objective == "tis" and trainer.args.group_size == 4
