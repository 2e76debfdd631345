"""Datasets in TRL's formats, and reward functions with TRL's calling convention, used as they are.

Sources: a ``.jsonl``, ``.csv`` or ``.parquet`` file, or an in-memory ``datasets.Dataset`` (or any
sequence of dicts). Row formats (TRL's names):

* prompt-only:        ``{"prompt": "12+7="}``
* prompt-completion:  ``{"prompt": "12+7=", "completion": "19"}`` (the completion is the reference
  solution, used by the SFT warm start)
* conversational:     ``{"prompt": [{"role": "user", "content": "12+7="}]}``, optionally with a
  conversational ``completion``; or ``{"messages": [..., {"role": "assistant", ...}]}`` where the
  last assistant turn is the completion and the turns before it the prompt.

Conversational prompts are encoded with the tokenizer's chat template (``HFTokenizer.encode``).

The expert solution of a row (``Example.solution``: the SFT warm start's target, the expert row of
CalibRL / RL-PLUS) is its ``expert`` column if given, else its completion, else its ``solution``
column (a string or a number; other types are a bad row); an empty string counts as none.
Every other column (``answer``, ``solution``, ``ground_truth``, ...) is kept. ``answer`` (configurable)
is what tether-convention rewards ``fn(prompt, completion, answer)`` check; TRL-convention rewards
``fn(prompts, completions, **kwargs)`` get every column as a keyword list, like TRL passes them, with
``completions`` as strings (standard prompts) or ``[{"role": "assistant", "content": ...}]`` lists
(conversational prompts). A TRL reward returning ``None`` for a sample marks that sample failed
(reward 0, counted). A malformed row raises ``DatasetError`` naming the source, the row and the field.
"""

from __future__ import annotations

import inspect
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tether.tasks.math_reward  # noqa: F401  (registers the 'math_verify' reward)
from tether.tasks.base import DatasetExperts, Example
from tether.tasks.jsonl import DatasetError
from tether.tasks.readers import reader_for
from tether.tasks.rewards import BUILTIN_REWARDS, load_reward_fn, reward_ref
from tether.tasks.split import is_heldout
from tether.tasks.text import text_problem

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True, eq=False)
class TRLExample(Example):
    messages: tuple[dict, ...] | None = None
    """The conversational prompt (None for a plain-text prompt)."""
    fields: dict[str, Any] = field(default_factory=dict)
    """The row's other columns, for TRL-convention reward functions."""


def is_trl_reward(fn: Callable) -> bool:
    """TRL convention: the function takes ``completions`` (and ``prompts``) by keyword."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "completions" in params


def _location(source: str, row: int, field_name: str | None) -> str:
    where = f"{source}: row {row}"
    return where + (f": field '{field_name}'" if field_name else "")


class RowError(DatasetError):
    """A bad row of a TRL-format dataset: ``'<source>: row <n>: field '<f>': <what is wrong>'``."""

    def __init__(self, source: str, row: int, field_name: str | None, kind: str, message: str) -> None:
        super().__init__(source, row, field_name, kind, message)
        self.args = (f"{_location(source, row, field_name)}: {message}",)

    def __str__(self) -> str:
        return self.args[0]


def _messages(value: Any, source: str, row: int, name: str) -> tuple[dict, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise RowError(source, row, name, "wrong_type", "expected a non-empty list of {role, content} messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError(source, row, name, "wrong_type", f"message {i} is not a {{role, content}} object: {m!r}")
        if m["role"] not in ROLES or not isinstance(m["content"], str):
            raise RowError(source, row, name, "wrong_type",
                           f"message {i}: role must be one of {', '.join(ROLES)} and content a string, got {m!r}")
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)


def parse_row(data: Any, source: str, row: int, *, answer_field: str = "answer",
              max_prompt_chars: int = 8192) -> TRLExample:
    """One row in any TRL format -> ``TRLExample`` (or ``RowError``)."""
    if not isinstance(data, dict):
        raise RowError(source, row, None, "not_object", f"expected an object/dict row, got {type(data).__name__}")
    data = dict(data)
    messages = None
    solution = None
    if "messages" in data and "prompt" not in data:
        turns = _messages(data.pop("messages"), source, row, "messages")
        if turns[-1]["role"] != "assistant" or len(turns) < 2:
            raise RowError(source, row, "messages", "wrong_type",
                           "a 'messages' row must end with an assistant turn after at least one other turn")
        messages, solution = turns[:-1], turns[-1]["content"]
    elif "prompt" in data:
        prompt = data.pop("prompt")
        if isinstance(prompt, str):
            if not prompt.strip():
                raise RowError(source, row, "prompt", "empty_prompt", "empty prompt")
        else:
            messages = _messages(prompt, source, row, "prompt")
    else:
        raise RowError(source, row, "prompt", "missing_field", f"missing (the row has {sorted(map(str, data))})")
    if "completion" in data:
        solution = _completion_text(data.pop("completion"), source, row, "completion")
    if solution is None and data.get("solution") not in (None, ""):  # open-r1 style: a worked solution column
        s = data["solution"]
        if not isinstance(s, (str, int, float)) or isinstance(s, bool):
            raise RowError(source, row, "solution", "wrong_type", f"expected a string or a number, got {type(s).__name__}")
        solution = str(s)
    if data.get("expert") not in (None, ""):  # the expert column wins (kept in the fields too, like 'solution')
        solution = _completion_text(data["expert"], source, row, "expert")
    text = messages[-1]["content"] if messages else prompt
    if len(text) > max_prompt_chars:
        raise RowError(source, row, "prompt", "prompt_too_long", f"{len(text)} characters > {max_prompt_chars}")
    answer = data.get(answer_field)
    if answer is not None and (not isinstance(answer, (str, int, float)) or isinstance(answer, bool)):
        raise RowError(source, row, answer_field, "wrong_type",
                       f"expected a string or a number, got {type(answer).__name__}")
    answer = "" if answer is None else str(answer)
    for name, value in (("prompt", text), (answer_field, answer), ("completion", solution)):
        if value is not None and (problem := text_problem(value)) is not None:
            raise RowError(source, row, name, "bad_text", problem)
    return TRLExample(prompt=text, answer=answer, solution=solution, messages=messages, fields=data)


def _completion_text(value: Any, source: str, row: int, name: str) -> str | None:
    """A completion column as text: a string, or the contents of a conversational turn list."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, (list, tuple)):
        raise RowError(source, row, name, "wrong_type",
                       f"expected a string or a list of {{role, content}} messages, got {type(value).__name__}")
    return "".join(m["content"] for m in _messages(value, source, row, name))


def _rows(source: Any) -> tuple[str, Sequence[Any]]:
    """The rows of a file (an unreadable row becomes a ``RowError`` in its place) or of a dataset."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"dataset file {str(path)!r} not found")
        rows = [raw.data if raw.error is None else RowError(str(path), raw.line, None, raw.error[0], raw.error[1])
                for raw in reader_for(path)(path)]
        return str(path), rows
    name = f"<{type(source).__name__}>"
    return name, source  # datasets.Dataset: indexing / iteration yields dicts


class TRLDatasetTask(DatasetExperts):
    """A task over a dataset in TRL's formats with a reward in either convention.

    Args:
        source: file path (.jsonl / .csv / .parquet) or an in-memory ``datasets.Dataset`` / list of dicts.
        reward: a callable, a built-in reward name or ``'module:function'``; TRL convention detected
            from a ``completions`` parameter.
        eval_fraction: share of prompts held out by hash; ``eval_size``: at most this many of them.
        answer_field: the column tether-convention rewards receive as ``answer``.
    """

    def __init__(self, source: Any, *, reward: Callable | str = "exact_match", eval_fraction: float = 0.1,
                 eval_size: int | None = None, answer_field: str = "answer", max_prompt_chars: int = 8192,
                 name: str | None = None, skip_bad_rows: bool = False) -> None:
        self.source, rows = _rows(source)
        self.skipped: list[RowError] = []  # with skip_bad_rows: every bad row, counted in the run summary
        self.name = name or (Path(source).stem if isinstance(source, (str, Path)) else "dataset")
        fn = load_reward_fn(reward) if isinstance(reward, str) else reward
        if not callable(fn):
            raise ValueError(f"reward must be callable or a reward spec, got {reward!r}")
        self.reward_fn, self.trl_convention = fn, is_trl_reward(fn)
        self.reward_ref = reward_ref(reward)  # its name in counters, how a reward worker imports it
        builtin = BUILTIN_REWARDS.get(reward) if isinstance(reward, str) else None
        self._train: list[TRLExample] = []
        self._eval: list[TRLExample] = []
        for i, data in enumerate(rows, start=1):
            try:
                if isinstance(data, RowError):
                    raise data
                ex = parse_row(data, self.source, i, answer_field=answer_field, max_prompt_chars=max_prompt_chars)
                if not self.trl_convention and answer_field not in ex.fields:
                    raise RowError(self.source, i, answer_field, "missing_field",
                                   f"missing; reward {getattr(fn, '__name__', fn)!r} takes (prompt, completion, answer)")
                if builtin is not None and builtin.check_answer is not None:
                    problem = builtin.check_answer(ex.answer)
                    if problem is not None:
                        raise RowError(self.source, i, answer_field, "bad_answer", f"{ex.answer!r} {problem}")
            except RowError as e:
                if not skip_bad_rows:
                    raise
                self.skipped.append(e)
                continue
            held = eval_fraction > 0 and is_heldout(ex.prompt, eval_fraction, "tether-trl-v1")
            (self._eval if held else self._train).append(ex)
        if eval_size is not None:
            self._eval = self._eval[:eval_size]
        if not self._train:
            raise ValueError(f"{self.source}: no training rows ({len(rows)} rows, {len(self._eval)} held out)")
        if not self._eval and eval_fraction > 0:
            raise ValueError(f"{self.source}: no evaluation rows; raise eval_fraction or set it to 0")

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    def use_eval_examples(self, examples: list[TRLExample]) -> None:
        """Evaluate on ``examples`` (a separate eval dataset) instead of the rows held out by hash."""
        if not examples:
            raise ValueError(f"{self.source}: the eval dataset has no rows")
        self._eval = list(examples)

    def sample(self, rng: random.Random) -> TRLExample:
        return self._train[rng.randrange(len(self._train))]

    def train_examples(self) -> list[TRLExample]:
        return list(self._train)

    def eval_examples(self) -> list[TRLExample]:
        return list(self._eval)

    def reward(self, prompt: str, completion: str, answer: str) -> float:
        """The reward of a plain row (TRL-convention rewards: prompt as the only field)."""
        return self.reward_for(TRLExample(prompt=prompt, answer=answer))(prompt, completion, answer)

    def reward_for(self, ex: Example) -> Callable[[str, str, str], Any]:
        """``fn(prompt, completion, answer)`` for one example: the reward itself, or the TRL-convention
        reward called on a batch of one with the example's columns as keyword lists."""
        if not self.trl_convention:
            return self.reward_fn
        messages, fields = getattr(ex, "messages", None), getattr(ex, "fields", None)

        def call(prompt: str, completion: str, answer: str):
            return call_trl_reward(self.reward_fn, prompt, completion, messages, fields)

        return call


def call_trl_reward(fn: Callable, prompt: str, completion: str, messages: Sequence[dict] | None,
                    fields: dict[str, Any] | None) -> Any:
    """A TRL-convention reward on a batch of one: ``fn(prompts=[..], completions=[..], **columns)``
    with the row's other columns as one-element lists; returns its one value."""
    if messages:
        prompts, completions = [list(messages)], [[{"role": "assistant", "content": completion}]]
    else:
        prompts, completions = [prompt], [completion]
    out = fn(prompts=prompts, completions=completions, **{k: [v] for k, v in (fields or {}).items()})
    if not isinstance(out, (list, tuple)) or len(out) != 1:
        raise TypeError(f"a TRL-convention reward must return a list with one value per completion, got {out!r}")
    return out[0]


@dataclass(frozen=True)
class TrainerState:
    """What a TRL-convention reward's ``trainer_state`` argument holds (TRL's ``TrainerState`` names)."""

    global_step: int
    """The RL step being scored (0-based; evaluations: the step they follow)."""
    max_steps: int
    """The run's ``steps``."""


_TRL_EXTRAS = ("prompts", "completions", "completion_ids", "trainer_state", "log_metric")


def trl_batch_kwargs(fn: Callable, calls: Sequence[Any], state: dict[str, int],
                     log_metric: Callable[[str, float], None]) -> dict[str, Any]:
    """TRL's keyword arguments for one call on a batch (``calls``: ``RewardCall``s): ``prompts``,
    ``completions`` (strings, or ``[{"role": "assistant", ...}]`` lists for conversational prompts),
    ``completion_ids``, every dataset column as a list (``None`` where a row lacks it),
    ``trainer_state`` and ``log_metric``. A function without ``**kwargs`` gets only the ones it names."""
    prompts, completions = [], []
    for c in calls:
        if c.messages:
            prompts.append(list(c.messages))
            completions.append([{"role": "assistant", "content": c.completion}])
        else:
            prompts.append(c.prompt)
            completions.append(c.completion)
    columns: dict[str, list] = {}
    for c in calls:
        for k in (c.fields or {}):
            columns.setdefault(k, [None] * len(calls))
    for i, c in enumerate(calls):
        for k, v in (c.fields or {}).items():
            columns[k][i] = v
    kwargs = {**{k: v for k, v in columns.items() if k not in _TRL_EXTRAS}, "prompts": prompts,
              "completions": completions,
              "completion_ids": [list(c.completion_ids) if c.completion_ids is not None else None for c in calls],
              "trainer_state": TrainerState(**state), "log_metric": log_metric}
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def call_trl_batch(fn: Callable, calls: Sequence[Any], state: dict[str, int]) -> tuple[list, dict[str, float]]:
    """One call of a TRL-convention reward on a whole batch (``trl_batch_kwargs``); an ``async def`` reward
    is awaited. Returns one ``ScoreResult`` per call under the failure rule (``None``: that sample failed)
    and what it logged with ``log_metric(name, value)`` (finite numbers; the last value of a name wins).
    Raises what the reward raised, or ``TypeError`` for a return value that is not one value per sample."""
    import asyncio

    from tether.tasks.rewards import to_reward

    logged: dict[str, float] = {}

    def log_metric(name: str, value: float) -> None:
        if not isinstance(name, str) or not name or len(name) > 100:
            raise ValueError(f"log_metric: the name must be a non-empty string of at most 100 characters, got {name!r}")
        v = float(value)
        if not math.isfinite(v):
            raise ValueError(f"log_metric({name!r}, ...): the value must be finite, got {value!r}")
        logged[name] = v

    out = fn(**trl_batch_kwargs(fn, calls, state, log_metric))
    if inspect.isawaitable(out):
        out = asyncio.run(_awaited(out))
    if not isinstance(out, (list, tuple)) or len(out) != len(calls):
        n = len(out) if isinstance(out, (list, tuple)) else type(out).__name__
        raise TypeError(f"a TRL-convention reward must return a list with one value per completion ({len(calls)}), "
                        f"got {n}")
    return [to_reward(v) for v in out], logged


async def _awaited(awaitable):
    return await awaitable


def encode_prompt(tokenizer: Any, ex: Example) -> list[int]:
    """Token ids of an example's prompt: its messages through the chat template when conversational."""
    messages = getattr(ex, "messages", None)
    if messages:
        if not getattr(tokenizer, "chat", False):
            raise ValueError("a conversational dataset needs a model whose tokenizer has a chat template")
        return tokenizer.encode(list(messages))
    return tokenizer.encode(ex.prompt)


def is_trl_format(path: str | Path) -> bool:
    """Whether a dataset file is in a TRL format that ``JsonlTask`` does not read: a conversational
    prompt, a 'messages' column, a 'completion' column or no 'answer' column (first readable row)."""
    try:
        for raw in reader_for(Path(path))(Path(path)):
            if raw.data is None:
                return False
            d = raw.data
            return ("messages" in d or "completion" in d or not isinstance(d.get("prompt", ""), str)
                    or "answer" not in d)
    except (OSError, ValueError):
        return False
    return False


_OPTIONS = ("reward", "eval_fraction", "eval_size", "answer_field", "max_prompt_chars", "skip_bad_rows")


def wants_trl_task(path: str, options: dict) -> bool:
    """Route a dataset path to ``TRLDatasetTask``: ``format='trl'``, a Parquet file, a TRL-format
    file, or a TRL-convention reward."""
    if options.get("format") == "trl" or Path(path).suffix.lower() == ".parquet" or is_trl_format(path):
        return True
    spec = options.get("reward")
    return isinstance(spec, str) and spec not in BUILTIN_REWARDS and is_trl_reward(load_reward_fn(spec))


def trl_task_from_path(path: str, options: dict) -> TRLDatasetTask:
    options = {k: v for k, v in options.items() if k != "format"}
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ValueError(f"dataset task {path!r} (TRL format): unknown option(s) {', '.join(unknown)}; "
                         f"valid options: {', '.join(_OPTIONS)}")
    return TRLDatasetTask(path, **options)


@dataclass(frozen=True)
class InMemoryConfig:
    reward: str | None = None
    """A reward spec replacing the registered reward (None: the registered one)."""
    eval_fraction: float = 0.1
    """Share of prompts held out for evaluation, by hash."""
    eval_size: int | None = None
    """At most this many evaluation rows."""
    answer_field: str = "answer"
    """The column tether-convention rewards get as ``answer``."""


def register_dataset(name: str, dataset: Any, reward: Callable | str) -> None:
    """Make an in-memory ``datasets.Dataset`` (or list of dicts) a task called ``name``, so that
    ``TrainConfig(task=name)`` trains on it with ``reward`` (either convention)."""
    from tether.tasks.registry import BUILTIN_TASKS, TaskSpec

    def build(cfg: InMemoryConfig) -> TRLDatasetTask:
        return TRLDatasetTask(dataset, reward=cfg.reward or reward, eval_fraction=cfg.eval_fraction,
                              eval_size=cfg.eval_size, answer_field=cfg.answer_field, name=name)

    BUILTIN_TASKS[name] = TaskSpec(name, InMemoryConfig, build, f"in-memory dataset ({len(dataset)} rows)")
