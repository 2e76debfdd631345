"""Scoring a run's completions: where the task's reward runs, what its failures count as, when they stop the run.

``Scorer(task, cfg, counters)`` is opened once per run (and closed on every exit path: it owns the
reward's worker processes). Where the reward runs (``tether.tasks.rewards.RewardRef``):

* user rewards (``module:function``, ``file.py:function``, TRL rewards, ``math_verify``) run in a
  ``RewardPool`` of ``cfg.reward_workers`` worker processes (none: one per CPU core, at most the
  batch), each call under the hard timeout ``cfg.reward_timeout_s``;
* tether's own bounded built-ins (``exact_match``, ``numeric``, ``countdown``, the arithmetic and
  countdown tasks) run in the trainer's process, unless ``cfg.reward_workers`` asks for workers;
* ``cfg.reward_workers = 0``, or a reward no fresh interpreter can import by name (a lambda, a
  closure, a function defined in ``__main__``), runs in the trainer's process under the thread
  timeout of ``tether.tasks.rewards.score`` (a warning says it is not isolated).

Counting: every failed training sample adds to ``counters["reward_failed"]`` and
``counters["reward_failed/<reward name>"]`` (``record``, called by the loop once per scored batch);
failed evaluation samples add to ``counters["eval_reward_failed"]``. Stop rule: when every reward
call of ``cfg.max_failed_reward_steps`` consecutive steps failed, ``record`` raises the loop's
``TrainingStopped`` naming the reward and its last error. A pool that cannot run at all (a worker
cannot import the reward) and too many hung in-process calls stop the run the same way.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from tether.tasks.base import Example, Task
from tether.tasks.reward_pool import RewardCall, RewardPool, RewardPoolError, default_workers
from tether.tasks.rewards import RewardRef, ScoreResult, TooManyHungRewards, log_failure, score
from tether.train.config import TrainConfig

log = logging.getLogger("tether.train.scoring")


def _stopped(message: str) -> Exception:
    from tether.train.errors import TrainingStopped  # lazily: the loops' module imports this one

    return TrainingStopped(message)


def pool_size(cfg: TrainConfig, ref: RewardRef) -> int:
    """Worker processes for this reward: 0 means it runs in the trainer's process."""
    if ref.spec is None:
        if not ref.trusted and cfg.reward_workers != 0:
            log.warning("reward %r cannot be imported by name in a worker process (a lambda, a closure or a function "
                        "defined in __main__); it runs in the trainer's process, where a hang or a crash is not "
                        "contained. Define it in a module to isolate it.", ref.name)
        return 0
    if cfg.reward_workers is None:
        return 0 if ref.trusted else default_workers(cfg.prompts_per_step * cfg.group_size)
    return cfg.reward_workers


class Scorer:
    """The task's reward, applied to a run's completions; see the module docstring."""

    def __init__(self, task: Task, cfg: TrainConfig, counters: dict[str, int]) -> None:
        self.task = task
        self.ref: RewardRef = getattr(task, "reward_ref", None) or RewardRef(f"{task.name}.reward", None)
        self.key = f"reward_failed/{self.ref.name}"
        self._counters = counters
        for k in ("reward_failed", self.key, "eval_reward_failed"):
            counters.setdefault(k, 0)
        self._trl = bool(getattr(task, "trl_convention", False))
        workers = pool_size(cfg, self.ref)
        self.pool = (RewardPool(self.ref.spec, workers=workers, timeout_s=cfg.reward_timeout_s,
                                trl_convention=self._trl, name=self.ref.name) if workers else None)
        self._timeout_s = None if self.ref.trusted else cfg.reward_timeout_s
        self._max_failed_steps = cfg.max_failed_reward_steps
        self._lock = threading.Lock()  # the async loop scores from two threads
        self.last_error: str | None = None
        self._step: int | None = None
        self._step_failed = self._step_total = self._streak_before = self._streak = 0
        self._streak_start: int | None = None

    # --------------------------------------------------------------------------------- scoring

    def score(self, examples: Sequence[Example], texts: Sequence[str]) -> list[ScoreResult]:
        """One result per (example, completion) pair, in order; failed samples are logged."""
        with self._lock:
            try:
                results = self._pooled(examples, texts) if self.pool is not None else self._in_process(examples, texts)
            except (RewardPoolError, TooManyHungRewards) as e:
                raise _stopped(str(e)) from e
        failed = [r for r in results if r.failed]
        if failed:
            self.last_error = failed[-1].reason
        return results

    def score_eval(self, examples: Sequence[Example], texts: Sequence[str]) -> list[ScoreResult]:
        """``score`` for evaluation: failures count in ``eval_reward_failed`` (never stop the run)."""
        results = self.score(examples, texts)
        self._counters["eval_reward_failed"] += sum(r.failed for r in results)
        return results

    def _pooled(self, examples, texts) -> list[ScoreResult]:
        calls = [RewardCall(ex.prompt, t, ex.answer, getattr(ex, "messages", None),
                            getattr(ex, "fields", None) if self._trl else None) for ex, t in zip(examples, texts)]
        results = self.pool.map(calls)
        for ex, r in zip(examples, results):
            if r.failed:
                log_failure(self.ref.name, r, ex.prompt)
        return results

    def _in_process(self, examples, texts) -> list[ScoreResult]:
        reward_for = getattr(self.task, "reward_for", None)  # TRL-convention rewards: per-row columns
        return [score(reward_for(ex) if reward_for else self.task.reward, ex.prompt, t, ex.answer,
                      timeout_s=self._timeout_s, name=self.ref.name) for ex, t in zip(examples, texts)]

    # -------------------------------------------------------------------------------- counting

    def record(self, failed: int, total: int, step: int) -> None:
        """Count a scored training batch of step ``step`` (several batches of one step add up) and
        apply the stop rule: raises ``TrainingStopped`` after ``max_failed_reward_steps``
        consecutive steps in which every reward call failed."""
        self._counters["reward_failed"] += failed
        self._counters[self.key] += failed
        if step != self._step:
            self._step, self._step_failed, self._step_total = step, 0, 0
            self._streak_before = self._streak
        self._step_failed += failed
        self._step_total += total
        all_failed = self._step_total > 0 and self._step_failed == self._step_total
        self._streak = self._streak_before + 1 if all_failed else 0
        if self._streak == 1:
            self._streak_start = step
        if self._streak >= self._max_failed_steps:
            raise _stopped(
                f"every reward call failed in {self._streak} consecutive steps (steps {self._streak_start}-{step}): "
                f"reward {self.ref.name!r}, last error: {self.last_error}. Fix the reward function (or what it "
                "depends on) and resume.")

    # --------------------------------------------------------------------------------- closing

    def close(self) -> None:
        """Kill the reward's worker processes (idempotent)."""
        if self.pool is not None:
            self.pool.close()

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
