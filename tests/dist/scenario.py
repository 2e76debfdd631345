"""The distributed scenarios, run by tests/dist/test_dist.py in a child process inside its own network namespace.

``python -m tests.dist.scenario OUT`` trains three tiny runs of 3 steps and prints one JSON line:

* ``reference``: ``rollout_workers = 0`` (one worker in this process, no Ray);
* ``ray2``: 2 rollout workers as Ray actors (a local cluster on 127.0.0.1), filesystem transport;
* ``killed``: as ``ray2``, but worker 1 SIGKILLs itself in the middle of step 1's batch (after 1 of its 2 groups);

and ``never_published``: 2 workers told to sync a version that was never written, with a 1 s timeout.

For each: whether its final weights equal the reference's bit for bit, the largest absolute difference, the rows
trained per step, and the dist / sync metrics. The reward is a synthetic one (share of digits in the completion),
so the untrained model gets non-zero advantages; rewards are computed by the trainer, never by the workers.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from tether.dist import driver
from tether.train import setup
from tether.train.run import Run
from tether.train.checkpoint import load_checkpoint_dir
from tether.train.config import TrainConfig

SMALL = dict(prompts_per_step=4, group_size=4, max_new_tokens=6, warmstart_steps=0, eval_size=4, threads=1,
             seed=5, progress=False, plots=False, checkpoint_every=3, lr=1e-3, objective="ppo", steps=3, mode="dist")


def digit_share(run, rollout, examples):
    """``Run.score`` with the share of digits as the one reward (non-zero advantages on an untrained model)."""
    texts = setup.completions(run.policy, rollout)
    return torch.tensor([sum(c.isdigit() for c in t) / max(len(t), 1) for t in texts]), 0, {}, {}


def _train(out: Path, name: str, **flat) -> dict:
    driver.train(TrainConfig.from_flat(**SMALL, out=str(out / name), **flat))
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    weights = load_checkpoint_dir(out / name / "checkpoints" / "step_000003").state["model"]
    return {"weights": weights, "rows": rows}


def _never_published(out: Path) -> dict:
    """Workers asked for a version the trainer never wrote: the sync must fail within its timeout, naming them."""
    cfg = TrainConfig.from_flat(**SMALL, rollout_workers=2, sync_timeout_s=1.0, out=str(out / "unused"))
    with driver.RayPool(cfg, out / "empty-sync-dir") as pool:
        t0 = time.perf_counter()
        try:
            pool.sync(99, timeout_s=1.0)
            error = ""
        except Exception as e:  # Ray wraps the worker's SyncTimeout in its task error
            error = f"{type(e).__name__}: {e}"
        return {"error": error[:2000], "seconds": time.perf_counter() - t0}


def main(out: Path) -> None:
    Run.score = digit_share  # the trainer scores; this process is the trainer
    runs = {"reference": _train(out, "reference", rollout_workers=0, sync_dir=str(out / "sync-ref"))}
    runs["ray2"] = _train(out, "ray2", rollout_workers=2, sync_timeout_s=60)
    os.environ[driver.KILL_ENV] = "1,1,1"
    runs["killed"] = _train(out, "killed", rollout_workers=2, sync_timeout_s=60)
    del os.environ[driver.KILL_ENV]
    report = {"never_published": _never_published(out)}
    ref = runs["reference"]["weights"]
    for name, r in runs.items():
        w = r["weights"]
        report[name] = {
            "bitwise": all(torch.equal(ref[k], w[k]) for k in ref),
            "max_abs_diff": max(float((ref[k].float() - w[k].float()).abs().max()) for k in ref),
            "rows_per_step": [row["meter/engine/n_seqs"] for row in r["rows"]],
            "last": {k: v for k, v in r["rows"][-1].items() if k.startswith(("dist/", "sync/", "alarm/"))},
            "per_step": [{k: v for k, v in row.items() if k.startswith(("dist/", "sync/", "meter/version/"))}
                         for row in r["rows"]],
        }
    print("SCENARIO " + json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
