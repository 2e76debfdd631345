"""Rewards with TRL's calling convention (and one broken tether-convention reward), for the reward tests.

Workers import them by file path. With ``$BATCH_LOG`` set, ``batched`` appends one JSON line per call
(its batch size, the step it was told, whether every completion came with its token ids) to that file.
"""

import asyncio
import json
import os
from pathlib import Path


def batched(prompts, completions, completion_ids, trainer_state, log_metric, answer, **kwargs):
    """1.0 where the completion's first line is the answer; records the call and logs its batch size."""
    path = os.environ.get("BATCH_LOG")
    if path:
        line = {"n": len(completions), "step": trainer_state.global_step, "max_steps": trainer_state.max_steps,
                "ids": all(isinstance(ids, list) for ids in completion_ids), "prompts": len(prompts)}
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")
    log_metric("batch_size", len(completions))
    return [1.0 if c.split("\n", 1)[0].strip() == a else 0.0 for c, a in zip(completions, answer)]


def names_state(completions, trainer_state):
    """Names trainer_state and nothing else (no **kwargs): the step it was given, for every sample."""
    return [float(trainer_state.global_step)] * len(completions)


def half_none(completions, **kwargs):
    """TRL's 'does not apply' value for every other sample."""
    return [None if i % 2 else 2.0 for i in range(len(completions))]


def broken(prompt, completion, answer):
    """A reward with a bug: it fails on every call."""
    digits = {"zero": 0}
    return digits[completion]  # the line the fail-fast traceback must name


_calls = {"a": 0, "b": 0}


async def _meet(me: str, other: str) -> list[float]:
    """Announce this call (its number in this process) and wait until the other reward's same call does:
    both finish only when the two calls run at the same time."""
    where = Path(os.environ["RENDEZVOUS"])
    n = _calls[me]
    _calls[me] += 1
    (where / f"{me}{n}").touch()
    for _ in range(300):  # 3 s
        if (where / f"{other}{n}").exists():
            return 1.0
        await asyncio.sleep(0.01)
    raise TimeoutError(f"reward {me}: call {n} of reward {other} never ran at the same time")


async def async_a(completions, **kwargs):
    value = await _meet("a", "b")
    return [value] * len(completions)


async def async_b(completions, **kwargs):
    value = await _meet("b", "a")
    return [value] * len(completions)


def sleepy(completions, **kwargs):
    """Hangs (the batched call's timeout must fail the whole batch)."""
    import time

    time.sleep(60)
    return [1.0] * len(completions)


def too_large_from_step_1(completions, trainer_state, **kwargs):
    """Scores 1.0 until step 1, then returns a value beyond the reward range on every sample."""
    return [1.0 if trainer_state.global_step < 1 else 1e39] * len(completions)
