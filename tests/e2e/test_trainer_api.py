"""Issue 20 item 1: ``tether.Trainer``, the object a TRL user expects: a config as a dict, a transformers model
object with its tokenizer, an in-memory dataset and eval dataset, a reward function, callbacks, ``train``,
``evaluate``, ``save_model`` and ``state``; it trains the same step as ``tether train``."""

import json

import pytest

from tests.engine.hf_helpers import tiny_llama_folder

pytestmark = pytest.mark.e2e
TINY = dict(steps=2, prompts_per_step=2, group_size=4, max_new_tokens=4, eval_size=4, threads=1, progress=False,
            checkpoint_every=2, seed=0)


def digits(completions, **kwargs):
    """TRL convention: more digits, more reward (varied rewards on a random model)."""
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]


ROWS = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(6) for b in range(6)]


class Recorder:
    def __init__(self):
        self.steps, self.evals, self.saves = [], [], []

    def on_step_end(self, metrics):
        self.steps.append(metrics["step"])

    def on_evaluate(self, when, value):
        self.evals.append(when)

    def on_save(self, step, path):
        self.saves.append(step)


def test_trainer_with_a_model_object_dataset_reward_and_callbacks(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tether import Trainer

    folder = tiny_llama_folder(tmp_path / "model")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder))
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rec = Recorder()
    trainer = Trainer(args={**TINY, "out": str(tmp_path / "run"), "lr": 1e-2}, model=model, tokenizer=tok,
                      train_dataset=ROWS[:30], eval_dataset=ROWS[30:], reward_funcs=[digits], callbacks=[rec])
    summary = trainer.train()
    assert rec.steps == [0, 1] and rec.evals == ["before training", "after training"] and rec.saves == [2]
    assert trainer.state.global_step == 2 and len(trainer.state.log_history) == 2
    assert [w for w, _ in trainer.state.evaluations] == ["before training", "after training"]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward/mean"] for r in rows] == [r["reward/mean"] for r in trainer.state.log_history]
    changed = any(not (trainer.model.state_dict()[k] == v).all() for k, v in before.items())
    assert changed, "the model object was not trained"
    assert trainer.evaluate() == pytest.approx(summary["eval/accuracy_after"])
    out = trainer.save_model(tmp_path / "export")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    for k, v in trainer.model.state_dict().items():
        assert (reloaded.state_dict()[k] == v).all(), k
    assert transformers.AutoTokenizer.from_pretrained(str(out)).encode("1+2=") == tok.encode("1+2=")


def test_trainer_eval_dataset_is_what_it_evaluates(tmp_path):
    """An eval dataset whose every answer the reward marks 1 scores 1.0; the train rows are not used for it."""
    from tether import Trainer

    def always_right(prompt, completion, answer):
        return 1.0 if answer == "yes" else 0.0

    trainer = Trainer(args={**TINY, "out": str(tmp_path / "run"), "warmstart_steps": 0}, model="tiny",
                      train_dataset=[{"prompt": "1+1=", "answer": "no"}] * 8,
                      eval_dataset=[{"prompt": "2+2=", "answer": "yes"}] * 3, reward_funcs=always_right)
    assert trainer.evaluate() == 1.0  # before training: the starting model on the eval dataset
    summary = trainer.train()
    assert summary["eval/accuracy_before"] == 1.0 and summary["eval/accuracy_after"] == 1.0
    assert "accuracy on 3 held-out problems" in (tmp_path / "run" / "progress.log").read_text()


def test_trainer_args_are_validated_like_the_cli(tmp_path):
    from tether import Trainer

    with pytest.raises(ValueError, match="learning_rate.*lr"):  # TRL's name gets tether's
        Trainer(args={"learning_rate": 1e-5})
    with pytest.raises(ValueError, match="steps"):
        Trainer(args={"steps": 0})
    with pytest.raises(ValueError, match="tokenizer"):
        import torch

        Trainer(model=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="save_model: nothing trained"):
        Trainer(args={"out": str(tmp_path / "r")}).save_model(tmp_path / "x")
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('objective = "tis"\nsteps = 3\n')
    assert Trainer(args=cfg_file).args.objective == "tis"
