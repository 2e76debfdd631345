"""DAgger's model teachers (tether.agent.dagger.ModelTeacher): greedy labels in one batched call, the settings
checked at the edge, and one step with each kind of loaded teacher (the built-in tiny model, a Hugging Face
folder)."""

from __future__ import annotations

import json

import pytest
import torch

from tether.train.config import TrainConfig

ENV = "tests.agent.toy_envs:Copy"


def test_model_teacher_labels_are_its_engines_greedy_actions_in_one_call():
    from tests.agent.toy_envs import ZEngine
    from tether.agent.dagger import ModelTeacher

    calls = []

    class Spy(ZEngine):
        def generate(self, prompts, params, *, seed=0, group_B=None):
            calls.append((len(prompts), params.top_k, params.max_new_tokens))
            return super().generate(prompts, params, seed=seed)

    t = ModelTeacher(Spy(), max_new_tokens=3, mask_EK=torch.tensor([[True, False]]))
    out = t.labels([None, None], [[1, 2], [3]])
    assert out == [([26, 29], [-0.5, -0.5]), ([26, 29], [-0.5, -0.5])]  # the engine's tokens and log mu
    assert calls == [(2, 1, 3)]  # one batched greedy call
    assert t.acts(0, 0) and not t.acts(0, 1) and not t.acts(0, 5)


def test_model_teacher_settings_are_validated(tmp_path):
    with pytest.raises(ValueError, match="dagger_teacher"):
        TrainConfig.from_flat(env=ENV, algorithm="dagger", dagger_teacher=str(tmp_path / "no_such_dir"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="Hugging Face student"):  # a model folder teaches a model student only
        TrainConfig.from_flat(env=ENV, algorithm="dagger", dagger_teacher=str(tmp_path))
    with pytest.raises(ValueError, match="dagger_teacher_steps"):
        TrainConfig.from_flat(env=ENV, algorithm="dagger", dagger_teacher="builtin", dagger_teacher_steps=-1)


@pytest.mark.e2e
def test_a_builtin_model_teacher_acts_and_labels(tmp_path):
    from tether.train.sync import train

    train(TrainConfig.from_flat(env=ENV, algorithm="dagger", dagger_teacher="builtin", dagger_teacher_steps=3,
                                prompts_per_step=4, group_size=4, max_new_tokens=3, warmstart_steps=5, eval_size=8,
                                progress=False, quiet=True, threads=1, steps=1, out=str(tmp_path / "run")))
    (r,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert r["dagger/teacher_token_frac"] == 1.0  # beta_0 = 1: the model teacher took every turn
    assert r["agent/mismatch/teacher/n_tokens"] > 0 and r["dagger/aggregate_rows"] >= 16


@pytest.mark.e2e
def test_a_hugging_face_teacher_folder_teaches_a_hugging_face_student(tmp_path):
    from tests.engine.hf_helpers import tiny_llama_folder
    from tether.train.sync import train

    student, teacher = tiny_llama_folder(tmp_path / "student", seed=0), tiny_llama_folder(tmp_path / "teacher", seed=1)
    train(TrainConfig.from_flat(env=ENV, algorithm="dagger", model=str(student), dagger_teacher=str(teacher),
                                prompts_per_step=2, group_size=2, max_new_tokens=3, eval_size=2, progress=False,
                                quiet=True, threads=1, steps=1, out=str(tmp_path / "run")))
    (r,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert r["dagger/teacher_token_frac"] == 1.0 and r["agent/mismatch/teacher/n_tokens"] > 0
    assert r["agent/mismatch/teacher/abs_logr_mean"] > 0  # another model's greedy actions under the student
