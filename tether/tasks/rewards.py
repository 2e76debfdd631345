"""Reward functions: the built-ins, loading a user's by import path, and the in-process runner.

A reward function has the signature ``fn(prompt: str, completion: str, answer: str) -> float``.

Failure rule (the trainer relies on it): a reward call that raises, runs longer than the timeout,
crashes its worker process, returns something that is not a real number, returns NaN/Inf or a
number too large to train on (``|r| > MAX_ABS_REWARD``) marks that sample *failed*. A failed sample
gets reward 0.0, is counted (``ScoreResult.failed``; the trainer sums them into its
``reward/failed`` metric and the run summary, under the reward's name) and is logged on the
``tether.tasks.rewards`` logger, naming the reward. The run continues.

Where rewards run: the trainer calls user rewards (``module:function``, ``file.py:function``, TRL
rewards) in worker processes with hard timeouts (``tether.tasks.reward_pool``); ``RewardRef`` says
what a task's reward is called and how a worker imports it. ``score`` here is the in-process runner,
used for tether's own built-in rewards (trusted, bounded: no timeout needed) and for rewards a worker
cannot import (a lambda, a closure, a function defined in ``__main__``). Its timeout uses a thread:
Python cannot kill a thread, so a hung call is *abandoned*, and C code that holds the GIL (a
catastrophic regex) cannot be interrupted at all. If more than ``max_abandoned`` abandoned calls are
alive at once, ``score`` raises ``TooManyHungRewards``.
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
import traceback as tb_module
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
    trusted: bool = False
    """tether's own bounded code (no third-party parsing): called in the trainer's process by default."""


BUILTIN_REWARDS: dict[str, BuiltinReward] = {
    "exact_match": BuiltinReward(exact_match, trusted=True),
    "numeric": BuiltinReward(numeric, answer_has_number, trusted=True),
    "numeric_first": BuiltinReward(numeric_first, answer_has_number, trusted=True),
}


def register_builtin_reward(name: str, fn: RewardFn, check_answer=None, trusted: bool = False) -> None:
    """Make ``name`` usable wherever a reward spec is accepted (tasks add their verifiers here).
    ``trusted``: tether's own bounded code, called in-process by default (else in a worker process)."""
    BUILTIN_REWARDS[name] = BuiltinReward(fn, check_answer, trusted)


# ------------------------------------------------------------------------------------------ loading


class RewardLoadError(ValueError):
    """A reward spec that cannot be resolved; the message says which part is wrong."""


def _import_module(module_name: str, spec: str, what: str = "reward"):
    """Import ``module_name`` (a dotted module or a ``.py`` file) for the reference ``spec``; a failure
    raises RewardLoadError, its message naming the ``what`` (``reward``, ``environment``) and the spec."""
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise RewardLoadError(f"{what} {spec!r}: file {str(path)!r} not found")
        mod_name = f"tether_user_reward_{abs(hash(str(path.resolve())))}"
        file_spec = importlib.util.spec_from_file_location(mod_name, path)
        if file_spec is None or file_spec.loader is None:
            raise RewardLoadError(f"{what} {spec!r}: cannot import file {str(path)!r}")
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[mod_name] = module
        try:
            file_spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(mod_name, None)
            raise RewardLoadError(f"{what} {spec!r}: importing {str(path)!r} failed: {type(e).__name__}: {e}") from e
        return module
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if missing == module_name or module_name.startswith(missing + "."):
            raise RewardLoadError(
                f"{what} {spec!r}: module {module_name!r} not found (is its directory on PYTHONPATH? "
                f"the current directory is {str(Path.cwd())!r}; a file path like 'my_rewards.py:fn' also works)"
            ) from e
        raise RewardLoadError(
            f"{what} {spec!r}: importing module {module_name!r} failed because it imports the missing "
            f"module {missing!r}"
        ) from e
    except Exception as e:
        raise RewardLoadError(
            f"{what} {spec!r}: importing module {module_name!r} failed: {type(e).__name__}: {e}"
        ) from e


def load_reference(spec: str, what: str = "reward"):
    """The object named by ``package.module:attr`` (the attribute may be dotted, ``module:Class.method``)
    or ``path/to/file.py:attr``, imported. Raises ``RewardLoadError`` naming the ``what`` (``reward``,
    ``environment``), the spec and the bad part: format, module, attribute."""
    module_name, _, attr_path = spec.rpartition(":")
    if not module_name or not attr_path:
        raise RewardLoadError(f"{what} {spec!r}: expected 'module:name' with both parts non-empty")
    if not module_name.endswith(".py") and not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", module_name):
        raise RewardLoadError(f"{what} {spec!r}: {module_name!r} is not a valid module name")
    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", attr_path):
        raise RewardLoadError(f"{what} {spec!r}: {attr_path!r} is not a valid attribute name")
    obj = _import_module(module_name, spec, what)
    for i, part in enumerate(attr_path.split(".")):
        if not hasattr(obj, part):
            where = module_name if i == 0 else ".".join(attr_path.split(".")[:i])
            public = sorted(n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None)))
            hint = f"; callables there: {', '.join(public[:20])}" if public else ""
            raise RewardLoadError(f"{what} {spec!r}: {where!r} has no attribute {part!r}{hint}")
        obj = getattr(obj, part)
    return obj


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
    obj = load_reference(spec)
    attr_path = spec.rpartition(":")[2]
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


# ------------------------------------------------------------------------------------------ weights

_WEIGHT = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[-+]?(?:inf|nan)", re.IGNORECASE)


def split_weight(text: str) -> tuple[str, float]:
    """``NAME[:WEIGHT]`` -> ``(NAME, weight)``; the weight defaults to 1.0.

    The rule (a ``module:function`` spec already holds one colon): a weight is a trailing ``:<number>``
    after a complete reward name, i.e. after a built-in (``numeric:0.5``) or after ``module:function``
    / ``file.py:function`` (``my_rewards:score:0.5``). ``my_rewards:0.5`` is refused (a module without
    a function, or a function named 0.5?), and so is a weight that is not a finite number. Syntax only:
    whether the name imports is ``load_reward_fn``'s check. Raises ``RewardLoadError``."""
    if not isinstance(text, str) or not text.strip():
        raise RewardLoadError(f"reward must be a non-empty 'NAME[:WEIGHT]', got {text!r}")
    text = text.strip()
    head, sep, tail = text.rpartition(":")
    if not sep or not _WEIGHT.fullmatch(tail.strip()):
        if sep and tail and not re.fullmatch(r"[A-Za-z_][\w.]*", tail):
            raise RewardLoadError(f"reward {text!r}: {tail!r} is neither a function name nor a weight (a number)")
        return text, 1.0
    weight = float(tail)
    if not math.isfinite(weight):
        raise RewardLoadError(f"reward {text!r}: the weight must be a finite number, got {tail!r}")
    head = head.strip()
    if head not in BUILTIN_REWARDS and ":" not in head:
        raise RewardLoadError(
            f"reward {text!r} is ambiguous: {head!r} is not a built-in ({', '.join(sorted(BUILTIN_REWARDS))}) and "
            f"has no ':function'; write 'module:function:{tail}' (a weight follows a complete reward name)")
    return head, weight


def short_name(spec: str) -> str:
    """What per-reward metrics call a reward: a built-in's name, else the function's name
    (``my_rewards:score`` -> ``score``, ``rewards.py:Judge.score`` -> ``Judge.score``)."""
    return spec if ":" not in spec else spec.rpartition(":")[2]


# --------------------------------------------------------------------------------------- references


@dataclass(frozen=True)
class RewardRef:
    """What a task's reward is called and where it may run."""

    name: str
    """The name failures are counted and reported under: the spec as given (``my_rewards:fn``,
    ``exact_match``), or ``module:qualname`` of a callable."""
    spec: str | None
    """What a worker process imports (``module:function`` or an absolute ``/path/file.py:function``);
    None when a fresh interpreter cannot import it by name (a lambda, a closure, ``__main__``)."""
    trusted: bool = False
    """tether's own bounded code: called in the trainer's process unless workers are asked for."""


def importable_spec(fn: Callable) -> str | None:
    """``'module:qualname'`` if importing that in a fresh interpreter gives ``fn`` back, else None."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<" in qualname:
        return None
    obj = sys.modules.get(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if obj is not fn or module.startswith("tether_user_reward_"):  # a file loaded by path has no importable name
        return None
    return f"{module}:{qualname}"


def reward_ref(reward: str | Callable) -> RewardRef:
    """The ``RewardRef`` of a reward spec (as ``load_reward_fn`` takes it) or of a callable."""
    if not isinstance(reward, str):
        name = f"{getattr(reward, '__module__', '?')}:{getattr(reward, '__qualname__', type(reward).__name__)}"
        return RewardRef(name, importable_spec(reward))
    spec = reward.strip()
    builtin = BUILTIN_REWARDS.get(spec)
    if builtin is not None:
        return RewardRef(spec, importable_spec(builtin.fn), builtin.trusted)
    module, _, attr = spec.rpartition(":")
    if module.endswith(".py"):  # the worker may not share the trainer's idea of a relative path
        return RewardRef(spec, f"{Path(module).resolve()}:{attr}")
    return RewardRef(spec, spec)


# ------------------------------------------------------------------------------------------- runner

MAX_ABS_REWARD = 1e12
"""Largest reward magnitude accepted. Group statistics square rewards in float32 (max about 3.4e38),
so larger values can overflow into non-finite advantages; a reward outside +-1e12 is the reward's
fault and fails the sample, rather than surfacing later as a non-finite loss."""


@dataclass(frozen=True)
class ScoreResult:
    reward: float
    """The reward; 0.0 when failed."""
    failed: bool = False
    reason: str | None = None
    """Why it failed: 'exception: <Type>: <msg>', 'timeout: ...', 'crash: ...', 'non-finite: ...',
    'out of range: ...', 'bad return type: <type>'."""
    traceback: str | None = None
    """For an exception: the reward's own traceback (frames inside tether left out), printed when the
    failure stops the run."""

    @property
    def kind(self) -> str | None:
        """The reason's category ('exception', 'timeout', 'crash', 'non-finite', 'out of range', 'bad return type')."""
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


def to_reward(value: object) -> ScoreResult:
    """A reward function's return value under the failure rule: a real, finite number within
    ``MAX_ABS_REWARD``, else a failed ``ScoreResult`` saying what was wrong."""
    if isinstance(value, (str, bytes)) or value is None:
        return ScoreResult(0.0, True, f"bad return type: {type(value).__name__}")
    try:
        r = float(value)  # int, float, bool, numpy / torch scalars
    except OverflowError:
        return ScoreResult(0.0, True, f"non-finite: returned {type(value).__name__} too large for a float")
    except (TypeError, ValueError):
        return ScoreResult(0.0, True, f"bad return type: {type(value).__name__}")
    if not math.isfinite(r):
        return ScoreResult(0.0, True, f"non-finite: returned {r}")
    if abs(r) > MAX_ABS_REWARD:
        return ScoreResult(0.0, True, f"out of range: returned {r:g}, beyond +-{MAX_ABS_REWARD:g} "
                                      "(it would overflow the float32 advantages)")
    return ScoreResult(r)


def _exception_reason(e: BaseException) -> str:
    text = f"exception: {type(e).__name__}: {e}"
    return text if len(text) <= 300 else text[:297] + "..."


_TETHER_DIR = str(Path(__file__).resolve().parents[1])


def user_traceback(e: BaseException, limit: int = 4000) -> str:
    """The traceback of an exception raised by a user's reward, without tether's own frames (the
    caller's plumbing), so it starts at the user's function and names its file and line."""
    frames = [f for f in tb_module.extract_tb(e.__traceback__) if not f.filename.startswith(_TETHER_DIR)]
    text = "".join(["Traceback (most recent call last):\n", *tb_module.format_list(frames),
                    *tb_module.format_exception_only(type(e), e)])
    return text if len(text) <= limit else text[:limit - 4] + "...\n"


def failed_call(e: BaseException) -> ScoreResult:
    """The failed result of a call that raised ``e``, with the reward's traceback."""
    return ScoreResult(0.0, True, _exception_reason(e), user_traceback(e))


def call_reward(reward_fn: RewardFn, prompt: str, completion: str, answer: str) -> ScoreResult:
    """One call in this thread, no timeout, no logging: an exception or a bad value is a failed result."""
    try:
        value = reward_fn(prompt, completion, answer)
    except Exception as e:
        return failed_call(e)
    return to_reward(value)


def log_failure(name: str, result: ScoreResult, prompt: str) -> None:
    """The warning every failed sample gets, naming the reward and the reason."""
    log.warning("reward %r failed (%s) for prompt %r; sample gets reward 0", name, result.reason, prompt[:80])


def _name(reward_fn: object) -> str:
    return getattr(reward_fn, "__qualname__", None) or getattr(reward_fn, "__name__", None) or repr(reward_fn)


def score(
    reward_fn: RewardFn,
    prompt: str,
    completion: str,
    answer: str,
    timeout_s: float | None = None,
    max_abandoned: int = 8,
    name: str | None = None,
) -> ScoreResult:
    """Call ``reward_fn(prompt, completion, answer)`` in this process under the failure rule.

    ``timeout_s=None`` calls it in this thread (no timeout); otherwise in a daemon thread and a call
    still running after ``timeout_s`` seconds is abandoned and reported as a timeout. ``name``: what
    the warnings call the reward (default: the function's qualified name).
    """
    name = name or _name(reward_fn)
    if timeout_s is None:
        result = call_reward(reward_fn, prompt, completion, answer)
    else:
        result = _call_with_thread_timeout(reward_fn, prompt, completion, answer, timeout_s, max_abandoned, name)
    if result.failed:
        log_failure(name, result, prompt)
    return result


def _call_with_thread_timeout(reward_fn, prompt, completion, answer, timeout_s, max_abandoned, name) -> ScoreResult:
    return run_in_thread(lambda: call_reward(reward_fn, prompt, completion, answer), timeout_s, max_abandoned, name)


def run_in_thread(thunk: Callable[[], object], timeout_s: float | None, max_abandoned: int = 8,
                  name: str = "reward") -> object:
    """``thunk()``'s value, computed in a daemon thread under ``timeout_s`` (None: in this thread, no
    timeout); a call still running then is abandoned and an exception is caught: either way the value
    is a failed ``ScoreResult``. Raises ``TooManyHungRewards`` when ``max_abandoned`` abandoned calls
    are still alive."""
    if timeout_s is None:
        try:
            return thunk()
        except Exception as e:
            return failed_call(e)
    if not timeout_s > 0:
        raise ValueError(f"score: timeout_s must be > 0 or None, got {timeout_s}")
    if abandoned_alive() >= max_abandoned:
        raise TooManyHungRewards(
            f"{max_abandoned} timed-out calls of reward {name!r} are still running in the trainer's process; "
            "it appears to hang. Bound its running time, or run it in worker processes, which kill a hung call."
        )
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["result"] = thunk()
        except BaseException as e:  # noqa: BLE001 - SystemExit and the like: reported, never re-raised into the run
            box["result"] = failed_call(e)

    thread = threading.Thread(target=target, name="tether-reward", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        with _abandoned_lock:
            _abandoned.append(thread)
        return ScoreResult(0.0, True, f"timeout: no result within {timeout_s:g} s (the call is abandoned)")
    return box["result"]


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
