"""Bad input and bad numbers during `tether train`: clear errors, counted failures, safe stops."""

import json
from pathlib import Path

import pytest
import torch

from tests.processes import ROOT, run, tether_command
from tether.models.tokenizer import CharTokenizer
from tether.objectives import LossInputs
from tether.objectives.registry import _PRESETS, Preset
from tether.train import setup
from tether.train.checkpoint import load_latest_checkpoint
from tether.train.config import TrainConfig
from tether.train.sync import TrainingStopped, train

pytestmark = pytest.mark.e2e
SMALL = dict(steps=4, prompts_per_step=2, group_size=4, max_new_tokens=6, warmstart_steps=20, eval_size=5,
             progress=False, threads=2, checkpoint_every=1, plots=False)


def test_malformed_dataset_row_names_file_line_and_field(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2="}\n')
    r = run(tether_command("train", "--task", str(data), "--reward", "exact_match", "--out", str(tmp_path / "run"),
                           "--no-progress"), env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2
    assert "data.jsonl" in r.stderr and "line 2" in r.stderr and "answer" in r.stderr


def test_skip_bad_rows_counts_them_in_the_summary(tmp_path):
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10) for b in range(10)]
    lines = [json.dumps(r) for r in rows] + ["not json", '{"prompt": ""}', '{"prompt": 3, "answer": "1"}']
    data.write_text("\n".join(lines) + "\n")
    summary = train(TrainConfig.from_flat(task=str(data), reward="exact_match", skip_bad_rows=True, out=str(tmp_path / "run"),
                                **{**SMALL, "steps": 2}))
    assert summary["count/bad_rows_skipped"] == 3


def test_bad_text_rows_never_reach_training(tmp_path, monkeypatch):
    """Issue 13 item 12: a tab, an accented letter (not in the built-in tokenizer), a lone surrogate and
    a NUL byte are bad rows: named by file, line and field before any model is built, or skipped and
    counted with skip_bad_rows; the examples the run samples are all encodable."""
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10) for b in range(10)]
    bad = [{"prompt": "1\t+1=", "answer": "2"}, {"prompt": "1+1=", "answer": "d\u00e9ux"},
           {"prompt": "1+\ud800=", "answer": "2"}, {"prompt": "1+1=\u0000", "answer": "2"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:5] + bad + rows[5:]))
    built = []
    monkeypatch.setattr(setup, "build_policy", lambda *a, **k: built.append(1))
    with pytest.raises(ValueError, match=f"{data}: line 6: field 'prompt': character '\\\\t'"):
        train(TrainConfig.from_flat(task=str(data), reward="exact_match", out=str(tmp_path / "refused"), **SMALL))
    assert not built
    monkeypatch.undo()
    sampled, real_sample = [], setup.sample_examples

    def recording_sample(*args):
        examples = real_sample(*args)
        sampled.extend(examples)
        return examples

    monkeypatch.setattr(setup, "sample_examples", recording_sample)
    summary = train(TrainConfig.from_flat(task=str(data), reward="exact_match", skip_bad_rows=True, out=str(tmp_path / "run"),
                                **{**SMALL, "steps": 2}))
    assert summary["count/bad_rows_skipped"] == 4
    check = CharTokenizer().check
    assert len(sampled) == 4 and not any(check(ex.prompt) or check(ex.answer) for ex in sampled)


def raising_reward(prompt, completion, answer):
    if len(completion) % 2:
        raise RuntimeError("reward server down")
    return 1.0


def test_reward_exceptions_are_counted_and_the_run_continues(tmp_path, monkeypatch):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)}) for a in range(200)) + "\n")
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    summary = train(TrainConfig.from_flat(task=str(data), reward="test_train_robustness:raising_reward",
                                out=str(tmp_path / "run"), **SMALL))
    assert summary["count/reward_failed"] > 0
    assert summary["steps"] == SMALL["steps"]


def _nan_after_two_steps(inputs: LossInputs, *, agg: str):
    loss = -(inputs.advantages_BT * inputs.logp_theta_BT * inputs.maskf_BT).sum() / inputs.maskf_BT.sum()
    return loss * torch.nan, {}


def test_non_finite_steps_are_skipped_then_the_run_stops_with_checkpoint_intact(tmp_path):
    _PRESETS["test_nan"] = Preset(name="test_nan", description="always NaN", fn=_nan_after_two_steps,
                                  defaults={"agg": "token-mean"}, advantage="grpo", source="test", equation="nan")
    try:
        cfg = TrainConfig.from_flat(objective="test_nan", out=str(tmp_path / "run"), max_bad_steps=2, **{**SMALL, "steps": 6})
        with pytest.raises(TrainingStopped, match="2 consecutive non-finite steps"):
            train(cfg)
    finally:
        del _PRESETS["test_nan"]
    state = load_latest_checkpoint(tmp_path / "run")
    assert state["run_state"]["step"] == 1  # step 0 was bad but completed (weights untouched); step 1 stopped
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["alarm/non_finite"] == 1
