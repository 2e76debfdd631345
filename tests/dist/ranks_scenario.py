"""Sharded trainer-rank scenarios, run by tests/dist/test_ranks.py in a child process inside its own network and
PID namespaces (tests/dist/netns.py). ``python -m tests.dist.ranks_scenario WHICH OUT`` prints one JSON line:

* ``parity``: the same 2-step run with 1 trainer rank and with 2 (FSDP2 over gloo), final weights and optimiser
  state compared (issue 16 T2);
* ``ray``: the 1-rank run of ``parity`` against 2 Ray rollout workers with 2 trainer ranks (needs ray);
* ``signal``: ``tether train --trainer-ranks 2`` SIGTERMed once its first step is logged: it must checkpoint that
  step with both ranks, exit 128 + 15, and leave no trainer rank running;
* ``hang``: a 2-rank run whose rank 1 SIGSTOPs itself on step 1's batch, with a 5 s ``sync_timeout_s``: rank 0
  must stop with an error saying a rank did not answer, and the run must end (rank 1 killed);
* ``kill``: a 3-step reference with 1 rank; a 2-rank run whose rank 1 SIGKILLs itself on step 2's batch (it must
  stop with an error naming rank 1, its step-2 checkpoint intact), then resumed with 1 rank (T6, 2 -> 1);
* ``grow``: the 3-step reference; a 1-rank run of 2 steps resumed for the third with 2 ranks (T6, 1 -> 2), in
  micro-batches of 7 of the 8 rows, so rank 1's share of the second micro-batch is empty (it runs one row with
  weight 0) and rank 0's is one row.

Everything runs in float64 (the tolerance of the tests is 1e-10, not fp32's): the ranks sum their gradients in
another order than one backward over all rows, a difference of a few ulps, and AdamW divides each gradient by
its own running norm, so in fp32 a parameter whose gradient is at the noise level (about 1e-9) can move by a
visible fraction of the learning rate in one run and not in the other (1e-5 after 2 steps at lr 1e-3 here).
In float64 the same effect is below 1e-13.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tests.dist.scenario import SMALL, digit_share
from tether.dist import driver
from tether.dist.ranks import KILL_RANK_ENV
from tether.train import setup
from tether.train.run import Run
from tether.train.checkpoint import load_checkpoint_dir
from tether.train.config import TrainConfig

FLAT = dict(SMALL, prompts_per_step=2, eval_size=2, checkpoint_every=1, rollout_workers=0, probe_prompts=1,
            sync_timeout_s=30)


def _train(out: Path, name: str, *, ranks: int, steps: int, resume: bool = False, **flat: Any) -> dict:
    where = {"resume": str(out / name)} if resume else {"out": str(out / name)}
    t0 = time.perf_counter()
    try:
        driver.train(TrainConfig.from_flat(**{**FLAT, "steps": steps, **flat}, trainer_ranks=ranks, **where))
        error = ""
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    return {"error": error[:3000], "seconds": time.perf_counter() - t0, "rows": rows}


def _state(out: Path, name: str, step: int) -> dict:
    return load_checkpoint_dir(out / name / "checkpoints" / f"step_{step:06d}").state


def _diff(a: dict, b: dict) -> float:
    """Largest absolute difference over the model and the optimiser's moments (keys must match)."""
    assert a["model"].keys() == b["model"].keys()
    diffs = [float((a["model"][k] - b["model"][k]).abs().max()) for k in a["model"]]
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    diffs += [float((sa[i][n] - sb[i][n]).abs().max()) for i in sa for n in sa[i]]
    return max(diffs)


def _moved(a: dict, b: dict) -> float:
    return max(float((a["model"][k] - b["model"][k]).abs().max()) for k in a["model"])


def _signalled(out: Path) -> dict:
    """The CLI's clean stop on SIGTERM with 2 trainer ranks (this process is PID 1 of its own namespace, so
    /proc shows exactly the processes the run left behind)."""
    import signal
    import subprocess

    from tests.processes import started

    run = out / "run"
    cmd = [sys.executable, "-m", "tether.cli", "train", "--mode", "dist", "--rollout-workers", "0", "--trainer-ranks",
           "2", "--steps", "1000", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4",
           "--warmstart-steps", "0", "--eval-size", "2", "--threads", "1", "--checkpoint-every", "1000",
           "--no-progress", "--out", str(run)]
    metrics = run / "metrics.jsonl"
    with started(cmd, cwd=os.getcwd(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        deadline = time.monotonic() + 180
        while not (metrics.exists() and metrics.read_text().strip()) and proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
        # what the run left behind, looked at before `started` kills the child's process group on leaving
        left = []
        for p in Path("/proc").iterdir():
            if p.name.isdigit() and int(p.name) != os.getpid():
                try:
                    left.append((p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
                except OSError:
                    pass
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    return {"returncode": proc.returncode, "output": output[-2000:], "checkpoints": ckpts,
            "rows": len(metrics.read_text().splitlines()), "left": [c for c in left if "tether" in c]}


def main(which: str, out: Path) -> None:
    torch.set_default_dtype(torch.float64)
    Run.score = digit_share  # the trainer scores (rank 0); non-zero advantages on the untrained model
    report: dict = {}
    if which == "signal":
        report = _signalled(out)
    elif which == "hang":
        os.environ[KILL_RANK_ENV] = "1,1,hang"
        hung = _train(out, "hung", ranks=2, steps=3, sync_timeout_s=5)
        report = {"error": hung["error"], "seconds": hung["seconds"], "steps_logged": [r["step"] for r in hung["rows"]]}
    elif which in ("parity", "ray"):
        one = _train(out, "one", ranks=1, steps=2)
        two = _train(out, "two", ranks=2, steps=2, **({"rollout_workers": 2} if which == "ray" else {}))
        report = {"errors": [one["error"], two["error"]],
                  "diff": _diff(_state(out, "one", 2), _state(out, "two", 2)),
                  "diff_step1": _diff(_state(out, "one", 1), _state(out, "two", 1)),
                  "moved": _moved(_state(out, "one", 2), _state(out, "one", 1)),
                  "loss": [[r["loss"] for r in x["rows"]] for x in (one, two)],
                  "grad_norm": [[r["grad_norm"] for r in x["rows"]] for x in (one, two)],
                  "seconds": [one["seconds"], two["seconds"]],
                  "rank_log": (out / "two" / "ranks" / "rank-1.log").exists()}
    else:
        ref = _train(out, "ref", ranks=1, steps=3)
        report["errors"] = [ref["error"]]
        if which == "kill":
            os.environ[KILL_RANK_ENV] = "1,2"
            killed = _train(out, "cut", ranks=2, steps=3)
            del os.environ[KILL_RANK_ENV]
            report["killed"] = {"error": killed["error"], "seconds": killed["seconds"],
                                "steps_logged": [r["step"] for r in killed["rows"]],
                                "checkpoints": sorted(p.name for p in (out / "cut" / "checkpoints").iterdir()
                                                      if p.name.startswith("step_"))}
            resumed = _train(out, "cut", ranks=1, steps=3, resume=True)
        else:
            cut = _train(out, "cut", ranks=1, steps=2)
            report["errors"].append(cut["error"])
            resumed = _train(out, "cut", ranks=2, steps=3, resume=True, micro_batch_size=7)
        report["errors"].append(resumed["error"])
        report["diff"] = _diff(_state(out, "ref", 3), _state(out, "cut", 3))
        report["moved"] = _moved(_state(out, "ref", 3), _state(out, "ref", 2))
        report["steps_after_resume"] = [r["step"] for r in resumed["rows"]]
    print("SCENARIO " + json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
