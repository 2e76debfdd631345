"""Scoring a run's completions: where each reward runs, how several combine, what failures count as, when they stop the run.

``Scorer(task, cfg, counters)`` is opened once per run (and closed on every exit path: it owns the
rewards' worker processes). Its rewards (``RewardTerm``): ``cfg.reward``'s entries ``NAME[:WEIGHT]``,
else the task's own reward with weight 1. The reward of a sample is the weighted sum

    R_i = sum_k w_k r_ik        (a failed r_ik counts as 0, TRL's nansum of weight * reward)

Where a reward runs (``tether.tasks.rewards.RewardRef``):

* user rewards (``module:function``, ``file.py:function``, TRL rewards, ``math_verify``) run in a
  ``RewardPool`` of ``cfg.reward_workers`` worker processes (none: one per CPU core, at most the
  batch; a TRL-convention reward gets one, as it is called once per batch), each call under the hard
  timeout ``cfg.reward_timeout_s``;
* tether's own bounded built-ins (``exact_match``, ``numeric``, ``countdown``, the arithmetic and
  countdown tasks) run in the trainer's process, unless ``cfg.reward_workers`` asks for workers;
* ``cfg.reward_workers = 0``, or a reward no fresh interpreter can import by name (a lambda, a
  closure, a function defined in ``__main__``), runs in the trainer's process under the thread
  timeout of ``tether.tasks.rewards`` (a warning says it is not isolated).

How a reward is called: a tether-convention reward ``fn(prompt, completion, answer)`` once per sample;
a TRL-convention reward (it takes ``completions``) once per scored batch, with TRL's keyword arguments
(``tether.tasks.trl_data.call_trl_batch``); an ``async def`` reward is awaited. Several rewards are
called concurrently (one thread each, waiting on their own workers).

Counting: every failed call of a training sample adds to ``counters["reward_failed"]`` and
``counters["reward_failed/<reward name>"]`` (``record``, called by the loop once per scored batch);
failed evaluation calls add to ``counters["eval_reward_failed"]``. Stop rules (``record`` raises the
loop's ``TrainingStopped``): a reward that failed on every sample of the run's first scored step stops
it at once, with the reward's own traceback when it raised (fail fast: a broken reward is not trained
on for ``max_failed_reward_steps`` steps of zeros); after that, when every call of
``cfg.max_failed_reward_steps`` consecutive steps failed. A pool that cannot run at all (a worker
cannot import the reward) and too many hung in-process calls stop the run the same way.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from tether.tasks.base import Example, Task
from tether.tasks.reward_pool import RewardCall, RewardPool, RewardPoolError, default_workers
from tether.tasks.rewards import (
    RewardRef,
    ScoreResult,
    TooManyHungRewards,
    load_reward_fn,
    log_failure,
    reward_ref,
    run_in_thread,
    score,
    short_name,
)
from tether.train.config import TrainConfig

log = logging.getLogger("tether.train.scoring")


def _stopped(message: str) -> Exception:
    from tether.train.errors import TrainingStopped  # lazily: the loops' module imports this one

    return TrainingStopped(message)


def pool_size(cfg: TrainConfig, ref: RewardRef, batched: bool = False) -> int:
    """Worker processes for this reward: 0 means it runs in the trainer's process. A batched reward
    (called once per batch) needs one."""
    if ref.spec is None:
        if not ref.trusted and cfg.reward_workers != 0:
            log.warning("reward %r cannot be imported by name in a worker process (a lambda, a closure or a function "
                        "defined in __main__); it runs in the trainer's process, where a hang or a crash is not "
                        "contained. Define it in a module to isolate it.", ref.name)
        return 0
    if cfg.reward_workers is None:
        n = 0 if ref.trusted else default_workers(cfg.prompts_per_step * cfg.group_size)
    else:
        n = cfg.reward_workers
    return min(n, 1) if batched else n


@dataclass
class RewardTerm:
    """One reward of the run and its weight."""

    ref: RewardRef
    weight: float
    fn: Callable
    """In-process callable: ``fn(prompt, completion, answer)``, or the TRL-convention function itself."""
    trl: bool
    """TRL convention: called once per batch with keyword lists."""
    metric: str = ""
    """Its name in per-reward metrics: ``reward/<metric>/mean``."""
    per_example: Callable[[Example], Callable] | None = None
    """The task's own per-example reward (``task.reward_for``), for the task's reward."""
    pool: RewardPool | None = None
    key: str = field(init=False)

    def __post_init__(self) -> None:
        self.key = f"reward_failed/{self.ref.name}"


def reward_terms(task: Task, cfg: TrainConfig, given: list[tuple[Any, float]] | None = None) -> list[RewardTerm]:
    """The run's rewards: ``given`` ``(callable or spec, weight)`` pairs (``tether.Trainer``'s ``reward_funcs``),
    else ``cfg.reward``'s ``(spec, weight)`` entries, each loaded (a bad one raises ``RewardLoadError`` naming it,
    before any model is built), else the task's own reward."""
    from tether.tasks.trl_data import is_trl_reward

    if given:
        terms = []
        for reward, weight in given:
            fn = load_reward_fn(reward) if isinstance(reward, str) else reward
            if not callable(fn):
                raise ValueError(f"reward_funcs: {reward!r} is neither callable nor a reward name")
            terms.append(RewardTerm(reward_ref(reward), float(weight), fn, is_trl_reward(fn)))
    elif not cfg.rewards:
        ref = getattr(task, "reward_ref", None) or RewardRef(f"{task.name}.reward", None)
        trl = bool(getattr(task, "trl_convention", False))
        fn = getattr(task, "reward_fn", None) if trl else task.reward
        terms = [RewardTerm(ref, 1.0, fn, trl, per_example=None if trl else getattr(task, "reward_for", None))]
    else:
        terms = []
        for spec, weight in cfg.rewards:
            fn = load_reward_fn(spec)
            terms.append(RewardTerm(reward_ref(spec), weight, fn, is_trl_reward(fn)))
    shorts = [short_name(t.ref.name) for t in terms]
    for t, s in zip(terms, shorts):  # a function name two rewards share: both keep their full names
        t.metric = s if shorts.count(s) == 1 else t.ref.name
    return terms


@dataclass
class Scored:
    """A scored batch: the combined results, and each reward's values (NaN: failed) and logged metrics."""

    results: list[ScoreResult]
    """One per sample: reward = the weighted sum; failed = every reward failed on it."""
    values_K: list[list[float]]
    """``values_K[k][i]``: reward k's value on sample i, NaN where it failed."""
    metrics: dict[str, float]
    """What TRL-convention rewards logged with ``log_metric``, as ``reward/<name>/<metric>``."""

    @property
    def failed_calls(self) -> int:
        return sum(math.isnan(v) for vs in self.values_K for v in vs)

    @property
    def calls(self) -> int:
        return sum(len(vs) for vs in self.values_K)


class Scorer:
    """The run's rewards, applied to its completions; see the module docstring."""

    def __init__(self, task: Task, cfg: TrainConfig, counters: dict[str, int],
                 terms: list[RewardTerm] | None = None) -> None:
        self.task = task
        self.terms = terms if terms is not None else reward_terms(task, cfg)
        self._counters = counters
        for k in ("reward_failed", "eval_reward_failed", *(t.key for t in self.terms)):
            counters.setdefault(k, 0)
        self._timeout_s = cfg.reward_timeout_s
        self._max_steps = cfg.steps
        self._max_failed_steps = cfg.max_failed_reward_steps
        self._lock = threading.Lock()  # the async loop scores from two threads
        self.last_error: str | None = None
        self._first_failure: dict[str, ScoreResult] = {}  # per reward: its first failure (the traceback shown)
        self._step: int | None = None
        self._recorded_steps = 0
        self._step_failed = self._step_total = self._streak_before = self._streak = 0
        self._step_by_term: dict[str, list[int]] = {}
        self._streak_start: int | None = None
        try:
            for t in self.terms:
                workers = pool_size(cfg, t.ref, batched=t.trl)
                if workers:
                    t.pool = RewardPool(t.ref.spec, workers=workers, timeout_s=cfg.reward_timeout_s,
                                        trl_convention=t.trl, name=t.ref.name)
        except BaseException:
            self.close()
            raise

    @property
    def ref(self) -> RewardRef:
        """The first reward's reference (a run with one reward: its reward)."""
        return self.terms[0].ref

    @property
    def pool(self) -> RewardPool | None:
        """The first reward's worker pool (None: it runs in the trainer's process)."""
        return self.terms[0].pool

    # --------------------------------------------------------------------------------- scoring

    def score(self, examples: Sequence[Example], texts: Sequence[str]) -> list[ScoreResult]:
        """One combined result per (example, completion) pair, in order; failed calls are logged."""
        return self.score_batch(examples, texts).results

    def score_batch(self, examples: Sequence[Example], texts: Sequence[str],
                    completion_ids: Sequence[Sequence[int]] | None = None, step: int = 0) -> Scored:
        """Every reward on every sample (the batched ones in one call), combined by weight."""
        with self._lock:
            try:
                if len(self.terms) == 1:
                    per_term = [self._term(self.terms[0], examples, texts, completion_ids, step)]
                else:  # concurrently: each thread waits on its own workers (or its own event loop)
                    with ThreadPoolExecutor(len(self.terms), thread_name_prefix="tether-reward") as ex:
                        futures = [ex.submit(self._term, t, examples, texts, completion_ids, step) for t in self.terms]
                        per_term = [f.result() for f in futures]
            except (RewardPoolError, TooManyHungRewards) as e:
                raise _stopped(str(e)) from e
        metrics: dict[str, float] = {}
        values_K = []
        for t, (results, logged) in zip(self.terms, per_term):
            values_K.append([math.nan if r.failed else r.reward for r in results])
            metrics.update({f"reward/{t.metric}/{k}": v for k, v in logged.items()})
            for r in results:
                if r.failed:
                    self.last_error = f"reward {t.ref.name!r}: {r.reason}" if len(self.terms) > 1 else r.reason
                    self._first_failure.setdefault(t.ref.name, r)
        combined = []
        for i in range(len(texts)):
            parts = [(t.weight, vs[i]) for t, vs in zip(self.terms, values_K)]
            ok = [w * v for w, v in parts if not math.isnan(v)]
            if ok:
                combined.append(ScoreResult(sum(ok)))
            else:
                first = per_term[0][0][i]
                combined.append(ScoreResult(0.0, True, first.reason, first.traceback))
        return Scored(combined, values_K, metrics)

    def score_eval(self, examples: Sequence[Example], texts: Sequence[str],
                   completion_ids: Sequence[Sequence[int]] | None = None) -> list[ScoreResult]:
        """``score`` for evaluation: failed calls count in ``eval_reward_failed`` (never stop the run)."""
        step = 0 if self._step is None else self._step + 1  # the step it follows
        scored = self.score_batch(examples, texts, completion_ids, step=step)
        self._counters["eval_reward_failed"] += scored.failed_calls
        return scored.results

    def _term(self, t: RewardTerm, examples, texts, completion_ids, step) -> tuple[list[ScoreResult], dict]:
        calls = [RewardCall(ex.prompt, text, ex.answer, getattr(ex, "messages", None),
                            _fields(ex) if t.trl else None,
                            tuple(completion_ids[i]) if completion_ids is not None else None)
                 for i, (ex, text) in enumerate(zip(examples, texts))]
        state = {"global_step": step, "max_steps": self._max_steps}
        if t.trl:
            results, logged = self._batched(t, calls, state)
        elif t.pool is not None:
            results, logged = t.pool.map(calls), {}
        else:
            timeout = None if t.ref.trusted else self._timeout_s
            results = [score(t.per_example(ex) if t.per_example else t.fn, ex.prompt, text, ex.answer,
                             timeout_s=timeout, name=t.ref.name) for ex, text in zip(examples, texts)]
            return results, {}
        for ex, r in zip(examples, results):
            if r.failed:
                log_failure(t.ref.name, r, ex.prompt)
        return results, logged

    def _batched(self, t: RewardTerm, calls: list[RewardCall], state: dict) -> tuple[list[ScoreResult], dict]:
        if not calls:
            return [], {}
        if t.pool is not None:
            return t.pool.call_batch(calls, state)
        from tether.tasks.trl_data import call_trl_batch

        timeout = None if t.ref.trusted else self._timeout_s
        out = run_in_thread(lambda: call_trl_batch(t.fn, calls, state), timeout, name=t.ref.name)
        if isinstance(out, ScoreResult):  # the whole call failed: every sample of the batch, for this reward
            return [out] * len(calls), {}
        return out

    # -------------------------------------------------------------------------------- counting

    def record(self, failed: int, total: int, step: int, by_reward: dict[str, int] | None = None) -> None:
        """Count a scored training batch of step ``step`` (several batches of one step add up): ``total``
        samples, each scored by every reward; ``failed`` of those calls failed, ``by_reward`` per reward name
        (None: all of the first reward's). Applies the stop rules of the module docstring."""
        by_reward = by_reward if by_reward is not None else {self.terms[0].ref.name: failed}
        per_term_calls, total = total, total * len(self.terms)
        self._counters["reward_failed"] += failed
        for t in self.terms:
            self._counters[t.key] += by_reward.get(t.ref.name, 0)
        if step != self._step:
            if self._step is not None and self._step_total > 0:
                self._recorded_steps += 1
            self._step, self._step_failed, self._step_total = step, 0, 0
            self._step_by_term = {t.ref.name: [0, 0] for t in self.terms}
            self._streak_before = self._streak
        self._step_failed += failed
        self._step_total += total
        for t in self.terms:
            counts = self._step_by_term[t.ref.name]
            counts[0] += by_reward.get(t.ref.name, 0)
            counts[1] += per_term_calls
        if self._recorded_steps == 0:
            self._fail_fast(step)
        all_failed = self._step_total > 0 and self._step_failed == self._step_total
        self._streak = self._streak_before + 1 if all_failed else 0
        if self._streak == 1:
            self._streak_start = step
        if self._streak >= self._max_failed_steps:
            raise _stopped(
                f"every reward call failed in {self._streak} consecutive steps (steps {self._streak_start}-{step}): "
                f"{self._names()}, last error: {self.last_error}. Fix the reward function (or what it "
                "depends on) and resume.")

    def _names(self) -> str:
        return "reward " + ", ".join(repr(t.ref.name) for t in self.terms)

    def _fail_fast(self, step: int) -> None:
        """The run's first scored step: a reward that failed on every one of its samples stops the run."""
        for t in self.terms:
            n_failed, n = self._step_by_term[t.ref.name]
            if n == 0 or n_failed < n:
                continue
            first = self._first_failure.get(t.ref.name)
            reason = first.reason if first is not None else self.last_error
            message = (f"reward {t.ref.name!r} failed on every sample of the first step (step {step}, {n} of {n}), "
                       f"first error: {reason}. Nothing is trained on a reward that never works: fix it and run again.")
            if first is not None and first.traceback:
                message += f"\nThe reward's traceback (its first failure):\n{first.traceback.rstrip()}"
            raise _stopped(message)

    # --------------------------------------------------------------------------------- closing

    def close(self) -> None:
        """Kill the rewards' worker processes (idempotent)."""
        for t in self.terms:
            if t.pool is not None:
                t.pool.close()

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _fields(ex: Example) -> dict[str, Any]:
    """The columns a TRL-convention reward gets for a row: a TRL dataset's own, else ``answer``."""
    fields = getattr(ex, "fields", None)
    return dict(fields) if fields is not None else {"answer": ex.answer}
