"""Reward functions: the built-in ones, loading a user's by import path, and a guarded runner.

A reward function has the signature ``fn(prompt: str, completion: str, answer: str) -> float``.

Failure rule (the trainer relies on it): a reward call that raises, runs longer than the timeout,
returns something that is not a real number, or returns NaN/Inf marks that sample *failed*. A failed
sample gets reward 0.0, is counted (``ScoreResult.failed``; the trainer sums them into its
``reward/failed`` metric and the run summary) and is logged on the ``tether.tasks.rewards`` logger.
The run continues. ``score`` never raises because of what the reward function does.

Timeouts use a thread: the call runs in a daemon thread and ``score`` waits at most ``timeout_s``.
Python cannot kill a thread, so a hung pure-Python reward function is *abandoned*, not stopped: it
keeps running in the background (holding the GIL part of the time) until it returns or the process
exits. If more than ``max_abandoned`` such threads are alive at once, ``score`` raises
``TooManyHungRewards`` rather than letting them pile up; make the reward function itself bounded.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import math
import re
import sys
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

RewardFn = Callable[[str, str, str], float]

log = logging.getLogger("tether.tasks.rewards")

# ---------------------------------------------------------------------------------------- built-ins

_NUMBER = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?", re.ASCII)


def first_line(completion: str) -> str:
    """The completion up to its first newline, stripped (built-in tasks answer on one line)."""
    return completion.split("\n", 1)[0].strip()


def exact_match(prompt: str, completion: str, answer: str) -> float:
    """1.0 if the completion's first line, stripped of surrounding whitespace, equals the answer
    stripped of surrounding whitespace; else 0.0. Case- and inner-whitespace-sensitive."""
    return 1.0 if first_line(completion) == answer.strip() else 0.0


def parse_number(text: str, position: str = "last") -> float | None:
    """The first or last decimal number in ``text`` (``1,234`` reads as two numbers); None if none."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    return float(found[0] if position == "first" else found[-1])


def _numeric(completion: str, answer: str, position: str, rel_tol: float, abs_tol: float) -> float:
    want = parse_number(answer, "first")
    if want is None or not math.isfinite(want):
        raise ValueError(f"answer {answer!r} contains no number")
    got = parse_number(completion, position)
    if got is None or not math.isfinite(got):
        return 0.0
    return 1.0 if math.isclose(got, want, rel_tol=rel_tol, abs_tol=abs_tol) else 0.0


def numeric(prompt: str, completion: str, answer: str) -> float:
    """1.0 if the LAST number in the completion equals the number in the answer within
    rel 1e-9 / abs 1e-6; else 0.0 (no number in the completion: 0.0). Raises if the answer has no
    number (a dataset error, found at load time by ``JsonlTask``)."""
    return _numeric(completion, answer, "last", 1e-9, 1e-6)


def numeric_first(prompt: str, completion: str, answer: str) -> float:
    """Like ``numeric`` but reads the FIRST number of the completion."""
    return _numeric(completion, answer, "first", 1e-9, 1e-6)


def make_numeric(position: str = "last", rel_tol: float = 1e-9, abs_tol: float = 1e-6) -> RewardFn:
    """A numeric reward with its own number position ('first' or 'last') and tolerances."""
    if position not in ("first", "last"):
        raise ValueError(f"make_numeric: position must be 'first' or 'last', got {position!r}")
    if rel_tol < 0 or abs_tol < 0:
        raise ValueError("make_numeric: rel_tol and abs_tol must be >= 0")

    def reward(prompt: str, completion: str, answer: str) -> float:
        return _numeric(completion, answer, position, rel_tol, abs_tol)

    reward.__name__ = f"numeric_{position}"
    return reward


def answer_has_number(answer: str) -> str | None:
    """Answer validator of the numeric rewards: None if fine, else the reason."""
    value = parse_number(answer, "first")
    if value is None or not math.isfinite(value):
        return "contains no number (needed by the numeric reward)"
    return None


@dataclass(frozen=True)
class BuiltinReward:
    fn: RewardFn
    check_answer: Callable[[str], str | None] | None = None
    """Validates a dataset answer at load time: None if usable, else why not."""


BUILTIN_REWARDS: dict[str, BuiltinReward] = {
    "exact_match": BuiltinReward(exact_match),
    "numeric": BuiltinReward(numeric, answer_has_number),
    "numeric_first": BuiltinReward(numeric_first, answer_has_number),
}


def register_builtin_reward(name: str, fn: RewardFn, check_answer=None) -> None:
    """Make ``name`` usable wherever a reward spec is accepted (tasks add their verifiers here)."""
    BUILTIN_REWARDS[name] = BuiltinReward(fn, check_answer)


# ------------------------------------------------------------------------------------------ loading


class RewardLoadError(ValueError):
    """A reward spec that cannot be resolved; the message says which part is wrong."""


def _import_module(module_name: str, spec: str):
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise RewardLoadError(f"reward {spec!r}: file {str(path)!r} not found")
        mod_name = f"tether_user_reward_{abs(hash(str(path.resolve())))}"
        file_spec = importlib.util.spec_from_file_location(mod_name, path)
        if file_spec is None or file_spec.loader is None:
            raise RewardLoadError(f"reward {spec!r}: cannot import file {str(path)!r}")
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[mod_name] = module
        try:
            file_spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(mod_name, None)
            raise RewardLoadError(f"reward {spec!r}: importing {str(path)!r} failed: {type(e).__name__}: {e}") from e
        return module
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if missing == module_name or module_name.startswith(missing + "."):
            raise RewardLoadError(
                f"reward {spec!r}: module {module_name!r} not found (is its directory on PYTHONPATH? "
                f"the current directory is {str(Path.cwd())!r}; a file path like 'my_rewards.py:fn' also works)"
            ) from e
        raise RewardLoadError(
            f"reward {spec!r}: importing module {module_name!r} failed because it imports the missing "
            f"module {missing!r}"
        ) from e
    except Exception as e:
        raise RewardLoadError(
            f"reward {spec!r}: importing module {module_name!r} failed: {type(e).__name__}: {e}"
        ) from e


def load_reward_fn(spec: str) -> RewardFn:
    """Resolve a reward spec: a built-in name (``exact_match``, ``numeric``, ...), an import path
    ``package.module:function`` (the attribute may be dotted, ``module:Class.method``) or a file path
    ``path/to/file.py:function``. The result must be callable with ``(prompt, completion, answer)``.

    Raises ``RewardLoadError`` naming the bad part: format, module, attribute, not callable, or a
    signature that cannot take three positional arguments.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise RewardLoadError(f"reward spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec].fn
    if spec.count(":") != 1 and not (spec.count(":") == 2 and re.match(r"^[A-Za-z]:[\\/]", spec)):
        raise RewardLoadError(
            f"reward {spec!r} is neither a built-in ({', '.join(sorted(BUILTIN_REWARDS))}) nor of the "
            "form 'module:function' or 'file.py:function'"
        )
    module_name, _, attr_path = spec.rpartition(":")
    if not module_name or not attr_path:
        raise RewardLoadError(f"reward {spec!r}: expected 'module:function' with both parts non-empty")
    if not module_name.endswith(".py") and not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", module_name):
        raise RewardLoadError(f"reward {spec!r}: {module_name!r} is not a valid module name")
    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", attr_path):
        raise RewardLoadError(f"reward {spec!r}: {attr_path!r} is not a valid attribute name")

    obj = _import_module(module_name, spec)
    for i, part in enumerate(attr_path.split(".")):
        if not hasattr(obj, part):
            where = module_name if i == 0 else ".".join(attr_path.split(".")[:i])
            public = sorted(n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None)))
            hint = f"; callables there: {', '.join(public[:20])}" if public else ""
            raise RewardLoadError(f"reward {spec!r}: {where!r} has no attribute {part!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardLoadError(f"reward {spec!r}: {attr_path!r} is a {type(obj).__name__}, not callable")
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        sig = None  # builtins / C functions: trust them
    if sig is not None and "completions" not in sig.parameters:  # TRL convention: tether.tasks.trl_data
        try:
            sig.bind("prompt", "completion", "answer")
        except TypeError as e:
            raise RewardLoadError(
                f"reward {spec!r}: {attr_path}{sig} cannot be called as fn(prompt, completion, answer): {e}"
            ) from e
    return obj


# ------------------------------------------------------------------------------------------- runner


@dataclass(frozen=True)
class ScoreResult:
    reward: float
    """The reward; 0.0 when failed."""
    failed: bool = False
    reason: str | None = None
    """Why it failed: 'exception: <Type>: <msg>', 'timeout', 'non-finite', 'bad return type: <type>'."""

    @property
    def kind(self) -> str | None:
        """The reason's category ('exception', 'timeout', 'non-finite', 'bad return type')."""
        return None if self.reason is None else self.reason.split(":", 1)[0]


class TooManyHungRewards(RuntimeError):
    """Too many abandoned reward calls are still running; the reward function hangs."""


_abandoned: list[threading.Thread] = []
_abandoned_lock = threading.Lock()


def abandoned_alive() -> int:
    """How many timed-out reward calls are still running in the background."""
    with _abandoned_lock:
        _abandoned[:] = [t for t in _abandoned if t.is_alive()]
        return len(_abandoned)


def _to_reward(value: object) -> ScoreResult:
    if isinstance(value, (str, bytes)) or value is None:
        return ScoreResult(0.0, True, f"bad return type: {type(value).__name__}")
    try:
        r = float(value)  # int, float, bool, numpy / torch scalars
    except (TypeError, ValueError):
        return ScoreResult(0.0, True, f"bad return type: {type(value).__name__}")
    if not math.isfinite(r):
        return ScoreResult(0.0, True, "non-finite")
    return ScoreResult(r)


def _exception_reason(e: BaseException) -> str:
    text = f"exception: {type(e).__name__}: {e}"
    return text if len(text) <= 300 else text[:297] + "..."


def _failed(reason: str, prompt: str) -> ScoreResult:
    log.warning("reward failed (%s) for prompt %r; sample gets reward 0", reason, prompt[:80])
    return ScoreResult(0.0, True, reason)


def score(
    reward_fn: RewardFn,
    prompt: str,
    completion: str,
    answer: str,
    timeout_s: float | None = None,
    max_abandoned: int = 8,
) -> ScoreResult:
    """Call ``reward_fn(prompt, completion, answer)`` under the failure rule of this module.

    ``timeout_s=None`` calls it in this thread (no timeout); otherwise in a daemon thread and a call
    still running after ``timeout_s`` seconds is abandoned and reported as ``'timeout'``.
    """
    if timeout_s is None:
        try:
            value = reward_fn(prompt, completion, answer)
        except Exception as e:
            return _failed(_exception_reason(e), prompt)
        result = _to_reward(value)
        return _failed(result.reason, prompt) if result.failed else result

    if not timeout_s > 0:
        raise ValueError(f"score: timeout_s must be > 0 or None, got {timeout_s}")
    if abandoned_alive() >= max_abandoned:
        raise TooManyHungRewards(
            f"{max_abandoned} timed-out calls of reward function {getattr(reward_fn, '__name__', reward_fn)!r} "
            "are still running; it appears to hang. Bound its running time."
        )
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = reward_fn(prompt, completion, answer)
        except BaseException as e:  # noqa: BLE001 - reported, never re-raised into the run
            box["error"] = e

    thread = threading.Thread(target=target, name="tether-reward", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        with _abandoned_lock:
            _abandoned.append(thread)
        return _failed("timeout", prompt)
    if "error" in box:
        e = box["error"]
        return _failed(_exception_reason(e), prompt)
    result = _to_reward(box.get("value"))
    return _failed(result.reason, prompt) if result.failed else result


def score_batch(
    reward_fn: RewardFn,
    prompts: Sequence[str],
    completions: Sequence[str],
    answers: Sequence[str],
    timeout_s: float | None = None,
) -> list[ScoreResult]:
    """``score`` for each (prompt, completion, answer) triple, in order."""
    if not len(prompts) == len(completions) == len(answers):
        raise ValueError(
            f"score_batch: got {len(prompts)} prompts, {len(completions)} completions, {len(answers)} answers"
        )
    return [score(reward_fn, p, c, a, timeout_s) for p, c, a in zip(prompts, completions, answers)]


def failure_counts(results: Sequence[ScoreResult]) -> dict[str, int]:
    """Failed samples by reason category, e.g. ``{'timeout': 2, 'exception': 1}``."""
    return dict(Counter(r.kind for r in results if r.failed))
