"""One reward worker process: imports a reward by name and scores one call at a time for ``RewardPool``.

Started by ``tether.tasks.reward_pool`` as a fresh interpreter running ``main()``. The protocol uses
the process's original stdin and stdout, taken over at start: the reward's own ``print`` goes to
stderr and its stdin is ``/dev/null``, so nothing the reward does can corrupt the protocol. A frame
is a 4-byte big-endian length and a payload of at most ``MAX_FRAME`` bytes.

* trainer -> worker, pickle (the trainer is the trusted side): first the set-up
  ``{"spec", "trl", "sys_path", "backstop_s"}``, then chunks: lists of ``(prompt, completion,
  answer, messages, fields)`` tuples, one per call.
* worker -> trainer, JSON only (the trainer never unpickles anything a reward produced):
  ``{"ready": true}`` or ``{"error": "..."}`` after set-up, then ``{"reward": float}`` or
  ``{"failed": "reason"}`` for each call as soon as it finishes, in order, under the failure rule
  of ``tether.tasks.rewards``.

The worker imports the reward with ``load_reward_fn(spec)`` (``module:function`` or
``/path/file.py:function``): code is never sent to it. It exits on end of input. As a backstop in
case the trainer dies without killing it, each call arms a real-time timer whose default action
(SIGALRM, no handler installed) ends the process ``backstop_s`` after the call started.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import struct
import sys
from typing import Any

HEADER = struct.Struct(">I")
MAX_FRAME = 64 << 20
"""Largest frame either side accepts (a request carries a prompt, a completion and a row's columns)."""


def frame(payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME:
        raise ValueError(f"reward worker frame of {len(payload)} bytes exceeds {MAX_FRAME}")
    return HEADER.pack(len(payload)) + payload


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> bytes | None:
    """The next frame's payload, or None at end of input."""
    header = _read_exact(fd, HEADER.size)
    if header is None:
        return None
    (n,) = HEADER.unpack(header)
    if n > MAX_FRAME:
        raise ValueError(f"reward worker: frame of {n} bytes exceeds {MAX_FRAME}")
    return _read_exact(fd, n)


def write_json(fd: int, message: dict[str, Any]) -> None:
    data = frame(json.dumps(message).encode())
    while data:
        data = data[os.write(fd, data):]


def _caller(fn, trl: bool):
    from tether.tasks.rewards import call_reward

    if not trl:
        return lambda p, c, a, messages, fields: call_reward(fn, p, c, a)
    from tether.tasks.trl_data import call_trl_reward

    return lambda p, c, a, messages, fields: call_reward(
        lambda p_, c_, a_: call_trl_reward(fn, p_, c_, messages, fields), p, c, a)


def main() -> int:
    fd_in, fd_out = os.dup(0), os.dup(1)  # the protocol's ends; fds 0 and 1 go to the reward
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    data = read_frame(fd_in)
    if data is None:
        return 0
    setup = pickle.loads(data)
    sys.path[:] = setup["sys_path"]
    try:
        from tether.tasks.rewards import load_reward_fn

        call = _caller(load_reward_fn(setup["spec"]), setup["trl"])
    except Exception as e:  # reported to the trainer, which stops with this message
        write_json(fd_out, {"error": f"{type(e).__name__}: {e}"[:2000]})
        return 1
    write_json(fd_out, {"ready": True})
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    while True:
        data = read_frame(fd_in)
        if data is None:
            return 0
        for prompt, completion, answer, messages, fields in pickle.loads(data):
            signal.setitimer(signal.ITIMER_REAL, setup["backstop_s"])
            result = call(prompt, completion, answer, messages, fields)
            signal.setitimer(signal.ITIMER_REAL, 0)
            write_json(fd_out, {"failed": result.reason} if result.failed else {"reward": result.reward})
