"""``tether engine-check`` in-process on tiny models: every flag, the JSON report, an engine that shifts
its log-probs by one position being caught (exit 1), a transform that cannot separate candidates, a
model folder given with --model, and bad input refused before any model is built."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
import torch  # noqa: E402

from tether.cli import main  # noqa: E402
from tether.engine import check  # noqa: E402

pytestmark = pytest.mark.engine

SMALL = ["--batch", "2", "--prompt-len", "5", "--max-new-tokens", "6", "--seed", "3", "--threads", "1"]


def report(tmp_path, *flags) -> tuple[int, dict]:
    out = tmp_path / "check.json"
    rc = main(["engine-check", *SMALL, "--json", str(out), *flags])
    return rc, {e["engine"]: e for e in json.loads(out.read_text())["engines"]}


def test_every_engine_is_classified_and_tethers_pass(tmp_path, capsys):
    rc, rows = report(tmp_path, "--temperature", "0.8", "--top-k", "15", "--top-p", "0.85", "--tol", "1e-4")
    assert rc == 0
    assert list(rows) == list(check.PROBES)
    for name in ("torch-builtin", "torch-lean", "torch-stock", "hf-generate-scores"):
        assert rows[name]["kind"] == "sampled", rows[name]
        assert rows[name]["max_abs_diff"]["sampled"] <= 1e-4
        assert rows[name]["max_abs_diff"]["raw"] > 1e-2  # the transform separates raw from sampled
        assert rows[name]["tokens_per_s"] > 0
    assert rows["hf-generate-logits"]["kind"] == "raw"  # generate's logits are the unprocessed ones
    assert rows["torch-lean"]["note"].endswith("path lean") and "path stock" in rows["torch-stock"]["note"]
    assert all(r["passed"] for r in rows.values())
    for name in ("vllm", "llama-cpp"):  # not installed in the test environment
        assert rows[name]["status"] == "skipped" and rows[name]["note"]
    text = capsys.readouterr().out
    assert "hf-generate-logits" in text and "T=0.8, top-k=15, top-p=0.85" in text


def test_an_engine_off_by_one_position_is_caught(tmp_path, monkeypatch, capsys):
    real = check._torch_engine

    def shifted(*a, **kw):  # the engine reports token i with token i-1's log-prob (llama-cpp-python#1983's kind)
        tokens, logp, path = real(*a, **kw)
        return tokens, torch.cat([torch.full_like(logp[:, :1], -1.0), logp[:, :-1]], 1), path

    monkeypatch.setattr(check, "_torch_engine", shifted)
    rc, rows = report(tmp_path, "--engines", "torch-lean", "hf-generate-logits")
    assert rc == 1
    assert list(rows) == ["torch-lean", "hf-generate-logits"]
    assert rows["torch-lean"]["kind"] == "sampled-shift-prev" and not rows["torch-lean"]["passed"]
    assert rows["hf-generate-logits"]["passed"]  # tether does not sample with generate: reported, never failed
    assert "torch-lean (used by tether)" in capsys.readouterr().out


def test_a_transform_that_does_not_separate_candidates_is_ambiguous_but_passes(tmp_path):
    rc, rows = report(tmp_path, "--engines", "torch-builtin", "--temperature", "1", "--top-k", "0", "--top-p", "1")
    assert rc == 0
    row = rows["torch-builtin"]
    assert row["kind"] == "ambiguous" and set(row["matches"]) == {"sampled", "tempered", "raw"} and row["passed"]


def test_model_folder(tmp_path):
    from tests.engine.hf_helpers import tiny_llama_folder

    folder = tiny_llama_folder(tmp_path / "llama")
    rc, rows = report(tmp_path, "--model", str(folder), "--engines", "torch-lean", "hf-generate-scores")
    assert rc == 0
    assert rows["torch-lean"]["kind"] == rows["hf-generate-scores"]["kind"] == "sampled"
    assert str(folder) in rows["torch-lean"]["note"]


@pytest.mark.parametrize("flags, message", [
    (["--top-k", "-1"], "top_k must be >= 1"),
    (["--top-p", "1.5"], "top_p must be in"),
    (["--temperature", "0"], "temperature must be > 0"),
    (["--max-new-tokens", "1"], "max_new_tokens must be >= 2"),
    (["--engines", "vllm", "torch-bogus"], "unknown engine"),
    (["--model", "/nonexistent/model"], "neither 'tiny'"),
])
def test_bad_input_is_refused(flags, message, capsys):
    assert main(["engine-check", *flags]) == 2
    assert message in capsys.readouterr().err


def test_the_vllm_probe_classifies_what_the_server_returns(tmp_path, monkeypatch):
    """The stand-in server (tests/engine/fake_vllm_server.py) returns made-up log-probs -(0.01 j): the
    probe must find them to be none of the candidates and fail the check, since tether samples with vLLM."""
    from tests.engine.test_engine_contract import FAKE_SERVER

    monkeypatch.setattr(check, "VLLM_COMMAND", FAKE_SERVER)
    rc, rows = report(tmp_path, "--engines", "vllm")
    row = rows["vllm"]
    assert (row["status"], row["kind"], row["used_by_tether"], row["passed"]) == ("ran", "none", True, False)
    assert row["max_abs_diff"]["raw"] > 1e-2  # and "sampled" is infinite (null): tokens outside top-k / top-p
    assert rc == 1


def test_a_probe_that_raises_is_an_error_row(tmp_path, monkeypatch):
    def broken(*a, **kw):
        raise RuntimeError("engine exploded")

    monkeypatch.setattr(check, "_torch_engine", broken)
    rc, rows = report(tmp_path, "--engines", "torch-stock", "hf-generate-scores")
    assert rc == 1
    assert rows["torch-stock"]["status"] == "error" and "engine exploded" in rows["torch-stock"]["note"]
    assert rows["hf-generate-scores"]["kind"] == "sampled"  # the other probes still ran


def test_threads_apply_during_the_check_and_are_restored(tmp_path, monkeypatch):
    real, seen = check._torch_engine, []

    def spy(*a, **kw):
        seen.append(torch.get_num_threads())
        return real(*a, **kw)

    monkeypatch.setattr(check, "_torch_engine", spy)
    before = torch.get_num_threads()
    out = tmp_path / "t.json"
    assert main(["engine-check", "--engines", "torch-builtin", "--threads", "2", "--max-new-tokens", "3",
                 "--json", str(out)]) == 0
    assert set(seen) == {2} and torch.get_num_threads() == before
    assert json.loads(out.read_text())["config"]["threads"] == 2


def test_without_transformers_the_builtin_probe_runs_and_the_others_are_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(check, "transformers_available", lambda: False)
    rc, rows = report(tmp_path)
    assert rc == 0
    assert rows["torch-builtin"]["kind"] == "sampled"
    for name in check.HF_PROBES:
        assert rows[name]["status"] == "skipped" and "needs transformers" in rows[name]["note"]
    assert main(["engine-check", "--model", "smollm2"]) == 2  # refused before anything loads
