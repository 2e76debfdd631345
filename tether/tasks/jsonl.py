"""User tasks from a dataset file: ``JsonlTask`` reads rows with a prompt and an answer.

Format (JSONL, one object per line; CSV with a header also works, see ``tether.tasks.readers``)::

    {"prompt": "12+7=", "answer": "19"}
    {"prompt": "Capital of France?", "answer": "Paris", "solution": "Paris"}

``prompt``: non-empty string of at most ``max_prompt_chars`` characters. ``answer``: non-empty string
(a JSON number is accepted and turned into its text). ``expert`` or ``solution``: optional string or
null, the expert (reference) completion: the SFT warm start's target and the expert row of CalibRL /
RL-PLUS; ``expert`` wins when a row has both. Other fields are ignored. Blank lines are not rows.

Bad rows: each problem becomes a ``DatasetError`` whose message names the file, the 1-based line and
the field. By default the first one is raised. With ``skip_bad_rows=True`` bad rows are skipped and
counted: ``n_skipped``, ``skipped_by_reason`` (per reason kind) and ``skipped`` (the errors), and a
warning is logged; nothing is dropped silently.

Split: without ``eval_path``, a row is held out for evaluation iff the hash of its prompt falls below
``eval_fraction`` (rows with the same prompt always share a split, independent of file order and
seed). With ``eval_path``, every row of ``path`` trains and every row of ``eval_path`` evaluates.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import tether.tasks.countdown  # noqa: F401  (registers the built-in 'countdown' reward)
from tether.tasks.base import DatasetExperts, Example
from tether.tasks.readers import RawRow, reader_for
from tether.tasks.rewards import BUILTIN_REWARDS, load_reward_fn, reward_ref
from tether.tasks.split import is_heldout
from tether.tasks.text import TextCheck, text_problem

log = logging.getLogger("tether.tasks.jsonl")

REASONS = (
    "invalid_utf8", "invalid_json", "not_object", "bad_columns", "missing_field", "wrong_type",
    "empty_prompt", "prompt_too_long", "empty_answer", "bad_answer", "bad_text", "unencodable",
)


class DatasetError(ValueError):
    """A bad dataset row; ``str(e)`` is ``'<file>: line <n>: field '<f>': <what is wrong>'``."""

    def __init__(self, path: str, line: int, field: str | None, kind: str, message: str) -> None:
        self.path, self.line, self.field, self.kind, self.message = path, line, field, kind, message
        where = f"{path}: line {line}"
        if field is not None:
            where += f": field '{field}'"
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class JsonlConfig:
    path: str
    """Dataset file (.jsonl or .csv)."""
    reward: str = "exact_match"
    """Built-in reward name (exact_match, numeric, numeric_first, countdown) or 'module:function' /
    'file.py:function' called as fn(prompt, completion, answer) -> float."""
    max_prompt_chars: int = 2048
    """Rows with a longer prompt are bad rows."""
    skip_bad_rows: bool = False
    """Skip (and count) bad rows instead of raising on the first one."""
    eval_fraction: float = 0.1
    """Share of rows held out for evaluation by prompt hash, in [0, 1); ignored with eval_path."""
    eval_path: str | None = None
    """A separate evaluation file; then every row of ``path`` is used for training."""
    eval_size: int | None = None
    """Use at most this many evaluation rows (the first ones in file order); None: all."""
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    solution_field: str = "solution"
    expert_field: str = "expert"
    """A second name of the expert-solution column; it wins over ``solution_field`` in a row with both."""

    def __post_init__(self) -> None:
        if not isinstance(self.path, (str, Path)) or not str(self.path):
            raise ValueError(f"JsonlConfig.path must be a file path, got {self.path!r}")
        if not isinstance(self.reward, str) or not self.reward:
            raise ValueError(f"JsonlConfig.reward must be a reward name or 'module:function', got {self.reward!r}")
        if not isinstance(self.max_prompt_chars, int) or self.max_prompt_chars < 1:
            raise ValueError(f"JsonlConfig.max_prompt_chars must be an int >= 1, got {self.max_prompt_chars!r}")
        if not isinstance(self.eval_fraction, (int, float)) or not 0 <= self.eval_fraction < 1:
            raise ValueError(f"JsonlConfig.eval_fraction must be in [0, 1), got {self.eval_fraction!r}")
        if self.eval_size is not None and (not isinstance(self.eval_size, int) or self.eval_size < 1):
            raise ValueError(f"JsonlConfig.eval_size must be an int >= 1 or None, got {self.eval_size!r}")


def _answer_text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    return None


def _type_name(value: object) -> str:
    return {str: "string", bool: "boolean", int: "number", float: "number", list: "array",
            dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


class JsonlTask(DatasetExperts):
    """A task whose examples come from a dataset file and whose reward is a named function."""

    def __init__(self, config: JsonlConfig | str, *, text_check: TextCheck | None = None, **options) -> None:
        """``text_check``: the model's tokenizer check (``CharTokenizer().check`` for the built-in model);
        a prompt, answer or solution it refuses is a bad row (kind ``unencodable``)."""
        self._text_check = text_check
        if isinstance(config, (str, Path)):
            config = JsonlConfig(path=str(config), **options)
        elif options:
            raise TypeError("JsonlTask: give either a JsonlConfig or a path with options, not both")
        self.config = config
        self.name = Path(config.path).stem
        self.reward_fn = load_reward_fn(config.reward)
        self.reward_ref = reward_ref(config.reward)  # its name in counters, how a reward worker imports it
        builtin = BUILTIN_REWARDS.get(config.reward)
        self._check_answer = builtin.check_answer if builtin is not None else None
        self.skipped: list[DatasetError] = []
        self.n_rows = 0

        rows = self._load(Path(config.path))
        if config.eval_path is not None:
            self._train = [ex for _, ex in rows]
            self._eval = [ex for _, ex in self._load(Path(config.eval_path))]
        else:
            self._train, self._eval = [], []
            for _, ex in rows:
                held = config.eval_fraction > 0 and is_heldout(ex.prompt, config.eval_fraction, "tether-jsonl-v1")
                (self._eval if held else self._train).append(ex)
        if config.eval_size is not None:
            self._eval = self._eval[: config.eval_size]

        if self.skipped:
            shown = "; ".join(str(e) for e in self.skipped[:3])
            log.warning("skipped %d bad rows %s: %s%s", self.n_skipped, dict(self.skipped_by_reason), shown,
                        " ..." if self.n_skipped > 3 else "")
        if not self._train:
            raise ValueError(
                f"{config.path}: no training rows ({self.n_rows} rows read, {self.n_skipped} skipped, "
                f"{len(self._eval)} held out for evaluation)"
            )
        if not self._eval and (config.eval_path is not None or config.eval_fraction > 0):
            raise ValueError(
                f"{config.eval_path or config.path}: no evaluation rows (eval_fraction={config.eval_fraction} of "
                f"{len(self._train)} rows gave none); raise eval_fraction, give eval_path, or set eval_fraction=0"
            )

    # ------------------------------------------------------------------------------- loading

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    @property
    def skipped_by_reason(self) -> dict[str, int]:
        return dict(Counter(e.kind for e in self.skipped))

    def _load(self, path: Path) -> list[tuple[int, Example]]:
        if not path.is_file():
            raise FileNotFoundError(f"dataset file {str(path)!r} not found")
        read = reader_for(path)
        out: list[tuple[int, Example]] = []
        for raw in read(path):
            self.n_rows += 1
            try:
                out.append((raw.line, self._validate(str(path), raw)))
            except DatasetError as e:
                if not self.config.skip_bad_rows:
                    raise
                self.skipped.append(e)
        return out

    def _validate(self, path: str, raw: RawRow) -> Example:
        c = self.config
        if raw.error is not None:
            kind, message = raw.error
            raise DatasetError(path, raw.line, None, kind, message)
        row = raw.data
        assert row is not None

        def fail(field: str, kind: str, message: str) -> DatasetError:
            return DatasetError(path, raw.line, field, kind, message)

        for field in (c.prompt_field, c.answer_field):
            if field not in row:
                raise fail(field, "missing_field", f"missing (the row has {sorted(map(str, row))})")
        prompt = row[c.prompt_field]
        if not isinstance(prompt, str):
            raise fail(c.prompt_field, "wrong_type", f"expected a string, got {_type_name(prompt)}")
        if not prompt.strip():
            raise fail(c.prompt_field, "empty_prompt", "empty prompt")
        if len(prompt) > c.max_prompt_chars:
            raise fail(c.prompt_field, "prompt_too_long",
                       f"{len(prompt)} characters, more than max_prompt_chars={c.max_prompt_chars}")
        answer = _answer_text(row[c.answer_field])
        if answer is None:
            raise fail(c.answer_field, "wrong_type",
                       f"expected a string or a finite number, got {_type_name(row[c.answer_field])}")
        if not answer.strip():
            raise fail(c.answer_field, "empty_answer", "empty answer")
        if self._check_answer is not None:
            problem = self._check_answer(answer)
            if problem is not None:
                raise fail(c.answer_field, "bad_answer", f"{answer!r} is not usable by reward {c.reward!r}: {problem}")
        solution = None
        for name in (c.solution_field, c.expert_field):  # the expert column, when given, wins
            value = row.get(name)
            if value is not None and value != "" and not isinstance(value, str):
                raise fail(name, "wrong_type", f"expected a string or null, got {_type_name(value)}")
            if value:  # CSV cells are never missing, only empty: "" is no solution
                solution = value
        for field, text in ((c.prompt_field, prompt), (c.answer_field, answer), (c.solution_field, solution)):
            if text is None:
                continue
            if (problem := text_problem(text)) is not None:
                raise fail(field, "bad_text", problem)
            if self._text_check is not None and (problem := self._text_check(text)) is not None:
                raise fail(field, "unencodable", problem)
        return Example(prompt=prompt, answer=answer, solution=solution)

    # ------------------------------------------------------------------------------ Task API

    def sample(self, rng: random.Random) -> Example:
        """A uniformly chosen training row."""
        return self._train[rng.randrange(len(self._train))]

    def train_examples(self) -> list[Example]:
        return list(self._train)

    def eval_examples(self) -> list[Example]:
        return list(self._eval)

    def reward(self, prompt: str, completion: str, answer: str) -> float:
        """The configured reward function, called directly (wrap it in ``rewards.score`` for the
        timeout and failure rule)."""
        return self.reward_fn(prompt, completion, answer)
