"""End to end: two tiny policies RL-trained a few steps from one base on two different tasks, merged from their
run directories with ``tether merge``, and the merged model evaluated on both tasks. Checks that the merge
loads and runs and changes the weights as the method says; it does not assert an accuracy gain (a few steps of
a random-weights model do not reliably give one)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.engine.hf_helpers import tiny_llama_folder
from tether.cli import main

pytestmark = pytest.mark.e2e
safetensors_torch = pytest.importorskip("safetensors.torch")
SMALL = dict(steps=2, prompts_per_step=2, group_size=4, max_new_tokens=6, eval_size=4, progress=False, threads=1,
             checkpoint_every=1, lr=5e-3, plots=False)


def task_files(tmp_path, name, op, reward_body):
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}{op}2=", "answer": str(eval(f"{a}{op}2"))}) + "\n"
                            for a in range(40)))
    reward = tmp_path / f"{name}_reward.py"
    reward.write_text(f"def reward(prompt, completion, answer):\n    return {reward_body}\n")
    return {"task": str(data), "reward": f"{reward}:reward", "task_options": {"eval_fraction": 0.2}}


def test_two_agents_trained_on_two_tasks_merge_and_evaluate_on_both(tmp_path, capsys):
    from tether import Trainer
    from tether.train.config import TrainConfig
    from tether.train.sync import train

    base = tiny_llama_folder(tmp_path / "base")
    # rewards that vary inside a group for a random-weights model, so every step updates the weights
    tasks = {"add": task_files(tmp_path, "add", "+", "float(len(completion) % 2)"),
             "mul": task_files(tmp_path, "mul", "*", "sum(c.isdigit() for c in completion) / 6")}
    runs = {}
    for name, task in tasks.items():
        runs[name] = tmp_path / f"run_{name}"
        summary = train(TrainConfig.from_flat(model=str(base), out=str(runs[name]), **task, **SMALL))
        assert summary["steps"] == 2
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(base), "--models", str(runs["add"]), str(runs["mul"]), "--out", str(out),
                 "--method", "ram", "--no-progress"]) == 0
    assert "a tether run directory" not in capsys.readouterr().out  # --no-progress: no notes either

    record = json.loads((out / "tether_merge.json").read_text())
    assert all(m["changed"] > 0 for m in record["models"])  # both runs moved the weights
    merged = safetensors_torch.load_file(str(out / "model.safetensors"))
    b = safetensors_torch.load_file(str(base / "model.safetensors"))
    assert any(not torch.equal(merged[k], b[k]) for k in b)

    for task in tasks.values():
        accuracy = Trainer(args={"model": str(out), **task, **SMALL}).evaluate()
        assert 0.0 <= accuracy <= 1.0
