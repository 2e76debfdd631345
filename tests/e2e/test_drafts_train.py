"""``tether train --drafts`` (issue 19 item 3): the training prompts carry the draft, outside the loss mask; the
evaluation prompts are plain; Dr.GRPO trains on it for two steps."""

from __future__ import annotations

import pytest

from tests.e2e.test_train_flags import SMALL, varied_reward
from tether.cli import main
from tether.engine.torch_engine import TorchEngine
from tether.models.tokenizer import CharTokenizer
from tether.tasks.drafts import example_seed, wrong_answer
from tether.train.metrics_log import read_metrics

pytestmark = pytest.mark.e2e


def test_tether_train_drafts_puts_the_draft_in_context_only(tmp_path, monkeypatch):
    calls = []
    real = TorchEngine.generate

    def spy(self, prompts, params, *, seed, **kw):
        rollout = real(self, prompts, params, seed=seed, **kw)
        calls.append(("train" if kw.get("group_B") is not None else "eval", prompts, rollout))
        return rollout

    monkeypatch.setattr(TorchEngine, "generate", spy)
    task = varied_reward(tmp_path)
    out = tmp_path / "run"
    argv = ["train", "--drafts", "mismatched-wrong", "--draft-template", "D{draft};{prompt}", "--objective", "dr_grpo",
            "--task", task["task"], "--reward", task["reward"], "--out", str(out), "--quiet", "--no-plots"]
    argv += [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items() if k not in ("progress", "plots")]
    assert main(argv) == 0
    assert len(read_metrics(out / "metrics.jsonl")) == SMALL["steps"]
    tok = CharTokenizer()
    train = [c for c in calls if c[0] == "train"]
    evals = [c for c in calls if c[0] == "eval"]
    assert len(train) == SMALL["steps"] and len(evals) >= 2  # before and after
    for _, prompts, rollout in train:
        for i, ids in enumerate(prompts):
            text = tok.decode(ids)
            draft, _, problem = text[1:].partition(";")
            a = int(problem.split("+")[0])
            assert text.startswith("D") and problem.endswith("+1=") and draft.lstrip("-").isdigit()
            seed = example_seed(0, problem)  # the run's seed (0) and the problem: a wrong answer to another one
            assert draft in {wrong_answer(str(b + 1), seed) for b in range(100) if b != a}
            # the draft is context: no prompt position is in the loss mask, every completion token is
            start = int(rollout.prompt_len_B[i])
            assert start == len(ids)
            assert not rollout.loss_mask_BT[i, :start].any()
            assert int(rollout.loss_mask_BT[i].sum()) == int(rollout.completion_len_B[i])
    for _, prompts, _ in evals:  # no draft at evaluation time
        assert all(not tok.decode(ids).startswith("D") for ids in prompts)
