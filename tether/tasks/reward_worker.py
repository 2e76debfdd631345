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
  ``{"failed": "reason", "traceback": "..."}`` (the traceback only for an exception) for each call as
  soon as it finishes, in order, under the failure rule of ``tether.tasks.rewards``.
* a batched call (TRL convention, ``tether.tasks.trl_data.call_trl_batch``): the request is a dict
  ``{"batch": [(prompt, completion, answer, messages, fields, completion_ids), ...], "state": {...}}``
  and the answer one message, ``{"batch": [[reward, null] or [null, reason], ...], "metrics": {...}}``
  or ``{"failed": reason, "traceback": ...}`` when the call itself failed.

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


def _batch(fn, request: dict) -> dict[str, Any]:
    """One batched call of a TRL-convention reward: its values (each ``[reward, None]`` or
    ``[None, reason]``) and logged metrics, or the whole call's failure."""
    from tether.tasks.reward_pool import RewardCall
    from tether.tasks.rewards import failed_call
    from tether.tasks.trl_data import call_trl_batch

    calls = [RewardCall(p, c, a, m, f, ids) for p, c, a, m, f, ids in request["batch"]]
    try:
        results, logged = call_trl_batch(fn, calls, request["state"])
    except Exception as e:
        failed = failed_call(e)
        return {"failed": failed.reason, "traceback": failed.traceback}
    return {"batch": [[None, r.reason] if r.failed else [r.reward, None] for r in results], "metrics": logged}


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

        fn = load_reward_fn(setup["spec"])
        call = _caller(fn, setup["trl"])
    except Exception as e:  # reported to the trainer, which stops with this message
        write_json(fd_out, {"error": f"{type(e).__name__}: {e}"[:2000]})
        return 1
    write_json(fd_out, {"ready": True})
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    while True:
        data = read_frame(fd_in)
        if data is None:
            return 0
        request = pickle.loads(data)
        if isinstance(request, dict):  # one call on the whole batch (TRL convention)
            signal.setitimer(signal.ITIMER_REAL, setup["backstop_s"])
            answer = _batch(fn, request)
            signal.setitimer(signal.ITIMER_REAL, 0)
            write_json(fd_out, answer)
            continue
        for prompt, completion, answer, messages, fields in request:
            signal.setitimer(signal.ITIMER_REAL, setup["backstop_s"])
            result = call(prompt, completion, answer, messages, fields)
            signal.setitimer(signal.ITIMER_REAL, 0)
            if not result.failed:
                write_json(fd_out, {"reward": result.reward})
            else:
                write_json(fd_out, {"failed": result.reason, **({"traceback": result.traceback} if result.traceback
                                                                 else {})})
