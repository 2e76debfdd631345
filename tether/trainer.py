"""``tether.Trainer``: the object a TRL user expects, over the same run the CLI drives.

    from tether import Trainer
    trainer = Trainer(args={"objective": "tis", "steps": 50}, model=model, tokenizer=tok,
                      train_dataset=rows, eval_dataset=held_out, reward_funcs=[my_reward])
    trainer.train()            # the summary dict `tether train` prints
    trainer.evaluate()         # greedy held-out accuracy of the current weights
    trainer.save_model("out")  # a Hugging Face folder (tether export's format)

Every argument maps onto ``TrainConfig`` or onto an object the run uses instead of a name in it (``Given``,
tether/train/run.py), so the Python API and the CLI validate the same way and train the same step.
``args`` is a ``TrainConfig``, a dict of its flat names (TRL's ``GRPOConfig`` names get a did-you-mean), or a
TOML / YAML file. ``model`` is a name (``tiny``, ``smollm2``, a folder, a ``.gguf``) or a transformers model object
with its ``tokenizer``. ``train_dataset`` / ``eval_dataset`` are a ``datasets.Dataset``, a list of dicts (TRL's
formats: ``prompt`` as text or chat messages) or a file. ``reward_funcs``: callables in either convention
(tether's ``(prompt, completion, answer)`` or TRL's ``(prompts, completions, **columns)``) or reward names.
``callbacks``: objects with any of ``on_step_end(metrics)``, ``on_evaluate(when, value)``, ``on_save(step, path)``.
docs/quickstart.md puts a TRL GRPO script and its tether port side by side.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tether.train.config import TrainConfig, TrainMode
from tether.train.run import Given


@dataclass
class TrainerState:
    """What a finished (or running) ``Trainer.train`` has produced."""
    global_step: int = 0
    log_history: list[dict[str, Any]] = field(default_factory=list)
    """Every step's metrics row, as written to RUN/metrics.jsonl."""
    evaluations: list[tuple[str, float]] = field(default_factory=list)
    """(when, value) of every evaluation: ``before training``, ``after training``."""
    run_dir: Path | None = None
    summary: dict[str, Any] | None = None


class _StateRecorder:
    def __init__(self, state: TrainerState) -> None:
        self.state = state

    def on_step_end(self, metrics: dict[str, Any]) -> None:
        self.state.global_step = int(metrics["step"]) + 1
        self.state.log_history.append(dict(metrics))

    def on_evaluate(self, when: str, value: float) -> None:
        self.state.evaluations.append((when, value))


def _config(args: Any, overrides: dict[str, Any]) -> TrainConfig:
    if args is None:
        values: dict[str, Any] = {}
    elif isinstance(args, TrainConfig):
        from tether.configs import to_dict

        values = to_dict(args)
    elif isinstance(args, dict):
        values = dict(args)
    elif isinstance(args, (str, Path)):
        from tether.configs import load_config_file

        values = load_config_file(args)
    else:
        raise ValueError(f"Trainer: args must be a TrainConfig, a dict of its fields or a config file path, got "
                         f"{type(args).__name__}")
    return values | overrides


def _is_model_object(model: Any) -> bool:
    import torch

    return isinstance(model, torch.nn.Module)


def _model_name(model: Any) -> str:
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return name or f"<{type(model).__name__} object>"


class Trainer:
    """RL post-training with tether's objectives and meter (module docstring)."""

    def __init__(self, args: TrainConfig | dict | str | Path | None = None, *, model: Any = None,
                 tokenizer: Any = None, train_dataset: Any = None, eval_dataset: Any = None,
                 reward_funcs: Sequence[Callable | str] | Callable | str | None = None,
                 reward_weights: Sequence[float] | None = None, callbacks: Sequence[Any] | None = None) -> None:
        overrides: dict[str, Any] = {}
        self._model_object = model if _is_model_object(model) else None
        if model is not None and self._model_object is None:
            if not isinstance(model, (str, Path)):
                raise ValueError(f"Trainer: model must be a name / path or a torch.nn.Module, got {type(model).__name__}")
            overrides["model"] = str(model)
        if self._model_object is not None:
            if tokenizer is None:
                raise ValueError("Trainer: a model object needs its tokenizer (tokenizer=...)")
            overrides["model"] = _model_name(model)
        elif tokenizer is not None:
            raise ValueError("Trainer: tokenizer is only for a model object; a model name loads its own")
        if isinstance(train_dataset, (str, Path)):
            overrides["task"] = str(train_dataset)
        funcs = [reward_funcs] if callable(reward_funcs) or isinstance(reward_funcs, str) else list(reward_funcs or [])
        if reward_weights is not None and len(reward_weights) != len(funcs):
            raise ValueError(f"Trainer: {len(reward_weights)} reward_weights for {len(funcs)} reward_funcs")
        for f in funcs:
            if not (callable(f) or isinstance(f, str)):
                raise ValueError(f"Trainer: reward_funcs entries must be callables or reward names, got {f!r}")
        values = _config(args, overrides)
        self.args = TrainConfig.from_flat(**values) if not isinstance(args, TrainConfig) or overrides else args
        if self._model_object is not None and self.args.mode is TrainMode.DIST:
            raise ValueError("Trainer: mode dist builds the model in each rollout worker from its name; pass model "
                             "as a name or path, not an object")
        self.state = TrainerState()
        self.callbacks = list(callbacks or [])
        self._funcs, self._weights = funcs, reward_weights
        self._task = self._build_task(train_dataset, eval_dataset, funcs, reward_weights, values)
        self.tokenizer = tokenizer
        self.model = self._model_object
        self._trained_policy = None

    # -- the task -----------------------------------------------------------------------------------
    def _build_task(self, train_dataset, eval_dataset, funcs, weights, values) -> Any:
        in_memory = train_dataset is not None and not isinstance(train_dataset, (str, Path))
        if not in_memory and eval_dataset is None:
            return None  # the config names the task; the run builds it (and scores with reward_funcs if given)
        from tether.tasks.trl_data import TRLDatasetTask

        if train_dataset is None:
            raise ValueError("Trainer: reward_funcs objects or eval_dataset need a train_dataset (a dataset, a list "
                             "of dicts or a file)")
        if not funcs:
            funcs = [self.args.reward or "exact_match"]
        reward = funcs[0]  # the rows are checked against the first reward's convention; all of them score
        task = TRLDatasetTask(train_dataset, reward=reward, eval_fraction=0.0 if eval_dataset is not None else 0.1,
                              eval_size=self.args.eval_size, name=values.get("task") and Path(values["task"]).stem,
                              skip_bad_rows=self.args.skip_bad_rows)
        if eval_dataset is not None:
            held = TRLDatasetTask(eval_dataset, reward=reward, eval_fraction=0.0, name="eval_dataset",
                                  skip_bad_rows=self.args.skip_bad_rows)
            task.use_eval_examples(held.train_examples()[: self.args.eval_size])
        return task

    # -- the verbs ----------------------------------------------------------------------------------
    def _rewards(self) -> list[tuple[Any, float]] | None:
        if not self._funcs:
            return None
        return list(zip(self._funcs, self._weights if self._weights is not None else [1.0] * len(self._funcs)))

    def _driver(self) -> Callable:
        if self.args.mode is TrainMode.ASYNC:
            from tether.train.async_loop import train
        elif self.args.mode is TrainMode.DIST:
            from tether.dist.driver import train
        else:
            from tether.train.sync import train
        return train

    def train(self) -> dict[str, Any]:
        """Train to ``args.steps`` (or resume, with ``args.resume``); returns the run's summary."""
        recorder = _StateRecorder(self.state)
        given = Given(task=self._task, model=self._model_object, tokenizer=self.tokenizer, rewards=self._rewards(),
                      callbacks=[recorder, *self.callbacks])
        keep = _KeepPolicy()
        given.callbacks.append(keep)
        summary = self._driver()(self.args, given)
        self.state.summary = summary
        self.state.run_dir = Path(summary["run_dir"])
        self._trained_policy = keep.policy
        if self._model_object is not None:
            self.model = keep.policy.model if keep.policy is not None else self.model
        return summary

    def evaluate(self) -> float:
        """Greedy held-out accuracy (an environment: success rate) of the current weights: the trained ones after
        ``train``, else the starting model (the built-in model after its warm start)."""
        from tether.train import setup
        from tether.train.scoring import Scorer, reward_terms

        policy = self._trained_policy
        task = self._task if self._task is not None else setup.build_task(self.args)
        if policy is None:
            policy = setup.build_policy(self.args, task, None, self._model_object, self.tokenizer)
        else:
            policy.engine.load_weights(policy.model.state_dict(), version=self.state.global_step)
        if self.args.env is not None:
            from tether.agent.loop import Episodes

            value = Episodes(self.args, task, policy).evaluate()
        else:
            cfg = dataclasses.replace(self.args, reward_workers=0)
            with Scorer(task, cfg, {}, reward_terms(task, cfg, self._rewards())) as scorer:
                value = setup.evaluate(policy, scorer, self.args)
        for cb in self.callbacks:
            if hasattr(cb, "on_evaluate"):
                cb.on_evaluate("evaluate()", value)
        return value

    def save_model(self, out: str | Path) -> Path:
        """The trained weights as a Hugging Face folder (``tether export``'s format: merged LoRA, fp32)."""
        if self.state.run_dir is None:
            raise ValueError("Trainer.save_model: nothing trained yet (call train() first)")
        out = Path(out)
        if self._model_object is None:
            from tether.train.export import export_run

            return export_run(self.state.run_dir, out)
        if out.exists() and any(out.iterdir()):
            raise FileExistsError(f"save_model: {out} exists and is not empty")
        import torch

        model = copy.deepcopy(self._trained_policy.model)
        if self.args.lora_r is not None:
            from tether.models.lora import merge_lora

            model = merge_lora(model)
        model.to(torch.float32).save_pretrained(str(out), safe_serialization=True)
        tok = getattr(self.tokenizer, "tokenizer", self.tokenizer)
        tok.save_pretrained(str(out))
        return out


class _KeepPolicy:
    """Holds on to the run's policy so ``evaluate`` / ``save_model`` see the trained weights after the run closes."""
    policy: Any = None

    def on_run_end(self, policy: Any) -> None:
        self.policy = policy
