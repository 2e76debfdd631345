"""Reward functions that misbehave on purpose, for the reward isolation tests.

Worker processes import them by name (``_hostile_rewards:fn`` with tests/unit on the path, or the file
path). With ``$HOSTILE_LOG`` set, every call appends one line ``<event> <pid>`` to that file (an
``O_APPEND`` write, so lines from several processes never interleave) before it misbehaves; tests
count the lines to know how many calls hung, and check the pids are gone afterwards.
"""

import math
import os
import re
import subprocess
import time
import zlib


def _log(event: str) -> None:
    path = os.environ.get("HOSTILE_LOG")
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{event} {os.getpid()}\n".encode())
        finally:
            os.close(fd)


def one_in_five(prompt: str, completion: str) -> bool:
    """A fixed fifth of the (prompt, completion) pairs, by hash."""
    return zlib.crc32(f"{prompt}|{completion}".encode()) % 5 == 0


def exact(prompt, completion, answer):
    return 1.0 if completion.strip() == answer.strip() else 0.0


def catastrophic_regex(n: int) -> None:
    """Exponential backtracking (about 2^n steps) inside the C regex engine, which holds the GIL."""
    re.match(r"(a+)+$", "a" * n + "b")


def regex_always(prompt, completion, answer):
    catastrophic_regex(int(os.environ.get("HOSTILE_REGEX_N", "40")))
    return 1.0


def _one_in_five_then(act, prompt, completion, answer):
    """``act()`` on one call in five (logged 'hang', and 'done' if it ever ends), then reward 1.0;
    the other calls are scored ('ok')."""
    if not one_in_five(prompt, completion):
        _log("ok")
        return exact(prompt, completion, answer)
    _log("hang")
    act()
    _log("done")
    return 1.0


def regex_one_in_five(prompt, completion, answer):
    """Holds the GIL for 2^HOSTILE_REGEX_N steps on one call in five, then says the answer is right."""
    return _one_in_five_then(lambda: catastrophic_regex(int(os.environ.get("HOSTILE_REGEX_N", "40"))),
                             prompt, completion, answer)


def sleep_one_in_five(prompt, completion, answer):
    """Hangs (a blocking sleep) on one call in five."""
    return _one_in_five_then(lambda: time.sleep(3600), prompt, completion, answer)


def sleep_on_4(prompt, completion, answer):
    if completion.endswith("4"):
        time.sleep(3600)
    return float(completion)


def exit_on_x(prompt, completion, answer):
    """The worker process dies (no exception, no cleanup) when the completion is 'x'."""
    if completion == "x":
        os._exit(7)
    return 0.5


BAD_VALUES = {"nan": math.nan, "inf": 1e400, "big_int": 10**400, "too_large": 1e39, "str": "1.0", "none": None}


def bad_value(prompt, completion, answer):
    return BAD_VALUES.get(completion, 1.0)


def always_too_large(prompt, completion, answer):
    """Finite as a Python float, infinite as float32."""
    _log("ok")
    return 1e39


def noisy(prompt, completion, answer):
    """Writes to stdout, including bytes that look like a protocol frame, then answers."""
    print("\x00\x00\x00\x05hello from the reward", flush=True)
    os.write(1, b"\x00\x00\x00\x02{}")
    return 2.0


def child_then_hang(prompt, completion, answer):
    """Starts a long-lived child process, logs its pid as 'child <pid>', then hangs."""
    child = subprocess.Popen(["sleep", "3600"])
    _log(f"child-of {child.pid}")
    time.sleep(3600)
    return 1.0


def trl_length(prompts, completions, **columns):
    """TRL convention: one value per completion; uses a dataset column."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [float(len(t)) * columns["weight"][i] for i, t in enumerate(texts)]
