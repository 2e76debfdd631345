"""Bad input for distillation fails early with a message naming what is wrong."""

from __future__ import annotations

import json

import pytest
import torch

from tether.distill.config import Algorithm, DistillConfig
from tether.distill.data import load_rows, rows_to_rollout
from tether.models.tokenizer import CharTokenizer


def test_teacher_vocab_mismatch_fails_before_any_compute(tmp_path, monkeypatch):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text(json.dumps({"vocab_size": 151936, "model_type": "qwen2"}))

    def no_compute(*a, **k):  # neither the student nor the teacher may be built
        raise AssertionError("weights were built before the vocabulary check")

    import tether.distill.loop as loop

    monkeypatch.setattr(loop, "build_student", no_compute)
    monkeypatch.setattr(loop, "build_teacher", no_compute)
    cfg = DistillConfig(teacher=str(teacher), out=str(tmp_path / "run"), progress=False)
    with pytest.raises(ValueError, match="teacher vocabulary size 151936 differs from the student's 99"):
        loop.distill(cfg)


def test_teacher_directory_without_config_is_named(tmp_path):
    import tether.distill.loop as loop

    with pytest.raises(FileNotFoundError, match="config field 'teacher'"):
        loop.distill(DistillConfig(teacher=str(tmp_path / "nope"), out=str(tmp_path / "run"), progress=False))


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_pear_data_missing_behaviour_logprobs_names_field_and_row(tmp_path):
    tok = CharTokenizer()
    data = tmp_path / "d.jsonl"
    _write(data, [
        {"prompt": "1+1=", "completion_ids": tok.encode("2") + [tok.eos_id], "logp_behaviour": [-0.1, -0.2]},
        {"prompt": "2+2=", "completion_ids": tok.encode("4") + [tok.eos_id]},
    ])
    with pytest.raises(ValueError, match=r"d.jsonl row 2: missing field 'logp_behaviour'"):
        load_rows(data, tok, need_behaviour=True)
    assert len(load_rows(data, tok, need_behaviour=False)) == 2  # plain SFT does not need it


def test_pear_data_wrong_length_and_values(tmp_path):
    tok = CharTokenizer()
    data = tmp_path / "d.jsonl"
    _write(data, [{"prompt": "1+1=", "completion_ids": [5, 6, 7], "logp_behaviour": [-0.1]}])
    with pytest.raises(ValueError, match="row 1: field 'logp_behaviour' has 1 entries for 3 completion tokens"):
        load_rows(data, tok, need_behaviour=True)
    _write(data, [{"prompt": "1+1=", "completion_ids": [5], "logp_behaviour": [0.5]}])
    with pytest.raises(ValueError, match="row 1: field 'logp_behaviour' must hold finite log-probabilities"):
        load_rows(data, tok, need_behaviour=True)


def test_pear_command_reports_missing_field(tmp_path, capsys, monkeypatch):
    import tether.distill.loop as loop
    from tether.cli import main

    monkeypatch.setattr(loop, "build_student", lambda *a, **k: pytest.fail("student built before the data check"))

    data = tmp_path / "d.jsonl"
    _write(data, [{"prompt": "1+1=", "completion": "2"}])
    rc = main(["distill", "--algorithm", "pear", "--data", str(data), "--out", str(tmp_path / "r"), "--no-progress"])
    assert rc == 2
    assert "row 1: missing field 'logp_behaviour'" in capsys.readouterr().err


def test_rows_to_rollout_places_behaviour_logprobs_on_the_completion():
    from tether.distill.data import Row

    rows = [Row([1, 2, 3], [4, 5], [-0.5, -0.25]), Row([1], [6, 7, 8], [-1.0, -2.0, -3.0])]
    r = rows_to_rollout(rows, pad_id=0)
    assert r.tokens_BT.tolist() == [[1, 2, 3, 4, 5], [1, 6, 7, 8, 0]]
    assert r.loss_mask_BT.tolist() == [[False, False, False, True, True], [False, True, True, True, False]]
    torch.testing.assert_close(r.logp_mu_BT[r.loss_mask_BT], torch.tensor([-0.5, -0.25, -1.0, -2.0, -3.0]))


def test_config_validation_names_fields():
    with pytest.raises(ValueError, match="'data' applies to algorithm sft or pear only"):
        DistillConfig(algorithm=Algorithm.OPD, data="x.jsonl")
    with pytest.raises(ValueError, match="'opsd_template'"):
        DistillConfig(opsd_template="{prompt}")
