"""The TRL snippet of docs/adapters.md, run as written on a tiny model built offline: it trains, TRL's
logs carry tether's metrics and meter, and its dump feeds ``tether meter``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.doc_blocks import exec_block
from tests.processes import run as run_child
from tests.processes import tether_command, tether_env

pytest.importorskip("trl")

from tests.engine.trl_helpers import tiny_hf_model  # noqa: E402

pytestmark = pytest.mark.e2e

DOC = Path(__file__).resolve().parents[2] / "docs" / "adapters.md"


def trl_snippet(which: str = "") -> str:
    text = DOC.read_text()
    start = text.index(f"<!-- e2e: tests/e2e/test_trl_adapter_run.py runs this block{which} -->")
    match = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert match, "docs/adapters.md: no python block after the e2e marker"
    return match.group(1)


def run_snippet(which: str, tmp_path, monkeypatch) -> dict:
    """Exec a docs/adapters.md TRL block in ``tmp_path`` with ``MODEL`` the tiny model, on CPU; its globals."""
    import torch

    torch.set_num_threads(1)
    model_dir = tiny_hf_model(tmp_path / "model")
    return exec_block(trl_snippet(which), DOC, tmp_path, monkeypatch, {
        'MODEL = "Qwen/Qwen2.5-0.5B-Instruct"': f"MODEL = {str(model_dir)!r}",
        'report_to="none")': 'report_to="none", use_cpu=True, disable_tqdm=True)'})


def test_the_documented_trl_script_trains_and_logs_tether_metrics(tmp_path, monkeypatch):
    scope = run_snippet("", tmp_path, monkeypatch)
    history = [row for row in scope["trainer"].state.log_history if "loss" in row]
    assert len(history) == 3
    for row in history:
        for key in ("tether/tis/weight_mean", "tether/pg/clipfrac", "tether/meter/staleness/ess_token",
                    "tether/meter/staleness/logr_p99"):
            assert key in row, key
        assert row["tether/tis/weight_mean"] == 1.0  # no vLLM: mu is pi_old
    # num_iterations=2: the second pass over a batch trains on tokens one update stale
    assert any(row["tether/meter/staleness/abs_logr_mean"] > 0 for row in history)
    assert history[0]["tether/meter/staleness/abs_logr_mean"] == 0.0

    dump = tmp_path / "grpo-tether" / "logprobs.jsonl"
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    assert len(rows) == 3 * 4  # 3 optimiser steps of one micro-batch of 4 completions
    out = run_child(tether_command("meter", str(dump), "--json"), env=tether_env())
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["meter/total/n_tokens"] == sum(sum(r["mask"]) for r in rows)
    stale = [r for r in rows if r["logp_old"] != r["logp_behave_old"]]
    assert stale and report["meter/decomp/staleness/var"] > 0


def test_a_stock_grpo_trainer_dump_matches_tethers(tmp_path):
    """TRL's own GRPOTrainer plus ``LogProbDump(path).attach(trainer)``, with ``beta > 0`` and
    ``num_iterations=2``: the dump's rows equal those of ``TetherGRPOTrainer(objective="grpo")``
    run with the same config and seed: the two losses are equal (KL included), so the two runs take the same
    steps and see the same log-probs. The KL enters the tether run's logs once the policy has moved."""
    import torch

    from tests.engine.trl_helpers import make_trainer, reward_digits
    from tether.adapters.trl_dump import LogProbDump

    torch.set_num_threads(1)
    # 3 steps: the KL's gradient is 0 at the reference (step 1), so only the logps of step 3 show step 2's KL
    config = dict(max_steps=3, num_iterations=2, beta=0.5, learning_rate=5e-2, max_completion_length=8)
    prompts = ["2+2=", "3+5=", "7+1=", "4+4="]
    dumps = {}
    for stock in (True, False):
        path = tmp_path / f"{'stock' if stock else 'tether'}.jsonl"
        trainer = make_trainer(tmp_path, stock=stock, reward=reward_digits, prompts=prompts,
                               output_dir=str(tmp_path / f"out-{stock}"), **config)
        LogProbDump(path).attach(trainer)  # the one line a TRL user adds
        trainer.train()
        dumps[stock] = [json.loads(line) for line in path.read_text().splitlines()]
        if not stock:
            history = [row for row in trainer.state.log_history if "loss" in row]
    stock_rows, tether_rows = dumps[True], dumps[False]
    assert len(stock_rows) == len(tether_rows) == 3 * 4
    assert [r["mask"] for r in stock_rows] == [r["mask"] for r in tether_rows]
    for col in ("logp_mu", "logp_old", "logp_behave_old", "entropy"):
        ours = torch.tensor([v for r in stock_rows for v in r[col]])
        theirs = torch.tensor([v for r in tether_rows for v in r[col]])
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4, msg=col)
    # the second pass over the batch is one update stale: the dump sees it
    assert stock_rows[0]["logp_old"] == stock_rows[0]["logp_behave_old"]
    assert any(r["logp_old"] != r["logp_behave_old"] for r in stock_rows[4:8])
    assert history[0]["tether/kl/mean"] == 0.0 and history[1]["tether/kl/mean"] > 0  # the policy left the reference


def test_the_documented_stock_grpo_script_dumps_for_tether_meter(tmp_path, monkeypatch, capsys):
    """The docs' unmodified-GRPOTrainer block: one ``attach`` line, a dump of every training micro-batch, and
    ``tether meter`` reads it (staleness from ``num_iterations=2``)."""
    import sys

    from trl import GRPOTrainer

    from tether.cli import main

    scope = run_snippet(" (stock GRPOTrainer)", tmp_path, monkeypatch)
    assert type(scope["trainer"]) is GRPOTrainer
    rows = [json.loads(line) for line in (tmp_path / "grpo-stock" / "logprobs.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 4 and [r["step"] for r in rows] == [s for s in range(3) for _ in range(4)]
    monkeypatch.setattr(sys, "argv", ["tether"])
    capsys.readouterr()  # TRL's own log lines
    assert main(["meter", str(tmp_path / "grpo-stock" / "logprobs.jsonl"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["meter/total/n_tokens"] == sum(sum(r["mask"]) for r in rows)
    assert report["meter/decomp/staleness/var"] > 0
