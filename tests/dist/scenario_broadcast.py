"""The broadcast weight transport's scenarios (issue 16 T1 and T3), run by tests/dist/test_broadcast.py in a child
process inside its own network namespace. ``python -m tests.dist.scenario_broadcast OUT`` prints one JSON line:

* ``reference``: ``rollout_workers = 0`` (one worker in this process, filesystem transport, no Ray);
* ``broadcast``: 2 Ray workers, weights broadcast over a gloo group of the trainer and the workers;
* ``killed``: as ``broadcast``, but worker 1 SIGKILLs itself while receiving tensor 3 of version 2: the sync fails,
  the worker is replaced, the group rebuilt and the sync retried (the run goes on);
* ``pool``: a pool alone: version 0 synced, then worker 1 killed mid-transfer of version 1 with a 5 s timeout
  (the error and how long it took; timeout 3 s), then ``recover`` and version 1 again (the workers' versions after it);
* ``transport``: three members in this process's threads (rank 0 sends, 1 and 2 receive): a round trip of mixed
  dtypes, a receiver told the wrong version, and a receiver whose trainer never sends (timeout 1 s).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import torch

from tests.dist.scenario import SMALL, _train, digit_share
from tether.dist import driver
from tether.dist.transport import BroadcastTransport
from tether.train import setup
from tether.train.run import Run
from tether.train.config import TrainConfig


def _pool(out: Path) -> dict:
    cfg = TrainConfig.from_flat(**SMALL, rollout_workers=2, weight_transport="broadcast", sync_timeout_s=3.0,
                                max_worker_restarts=1, out=str(out / "unused"))
    policy = setup.build_policy(cfg, setup.build_task(cfg))
    state = policy.model.state_dict()
    os.environ[driver.KILL_SYNC_ENV] = "1,1,3"
    try:
        with driver.RayPool(cfg, out / "unused-sync", state_fn=lambda: state) as pool:
            first = pool.sync(0, 3.0, state)
            t0 = time.perf_counter()
            try:
                pool.sync(1, 3.0, state)
                error = ""
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
            seconds = time.perf_counter() - t0
            recovered = pool.recover()
            sent, got = pool.sync(1, 3.0, state)
            versions = pool.ray.get([w.version.remote() for w in pool.workers])
    finally:
        del os.environ[driver.KILL_SYNC_ENV]
    return {"first_bytes": [g.bytes for g in first[1]], "error": error[:3000], "seconds": seconds,
            "recovered": recovered, "versions": versions, "restarts": pool.restarts,
            "bytes": [sent.bytes] + [g.bytes for g in got],
            "expected_bytes": sum(v.numel() * v.element_size() for v in state.values())}


def _transport() -> dict:
    store = BroadcastTransport.serve("127.0.0.1", 20)
    state = {"f32": torch.randn(4, 3), "f64": torch.randn(2, dtype=torch.float64), "i64": torch.arange(7),
             "bf16": torch.randn(5).to(torch.bfloat16), "mask": torch.tensor([True, False])}
    results: dict = {}

    def member(rank: int, generation: int, version: int, expect: int, timeout_s: float) -> None:
        client = BroadcastTransport.join("127.0.0.1", store.port, 20)
        t = BroadcastTransport(client, rank, 3, generation=generation, timeout_s=20)
        t0 = time.perf_counter()
        try:
            got, stats = t.receive(expect, timeout_s=timeout_s, receiver=f"worker-{rank - 1}")
            results[(generation, rank)] = {"equal": all(torch.equal(got[k], state[k]) and got[k].dtype == state[k].dtype
                                                        for k in state) and list(got) == list(state),
                                           "bytes": stats.bytes, "version": stats.version}
        except Exception as e:
            results[(generation, rank)] = {"error": f"{type(e).__name__}: {e}"[:1000],
                                           "seconds": time.perf_counter() - t0}

    def generation(g: int, version: int, expects: tuple[int, int], send: bool, timeout_s: float) -> dict:
        threads = [threading.Thread(target=member, args=(r, g, version, expects[r - 1], timeout_s)) for r in (1, 2)]
        for th in threads:
            th.start()
        root = BroadcastTransport(store, 0, 3, generation=g, timeout_s=20)
        try:
            sent = root.publish(state, version, timeout_s=20).bytes if send else None
        except RuntimeError as e:  # a receiver left the group: the trainer's side fails too
            sent = f"{type(e).__name__}: {e}"[:1000]
        for th in threads:
            th.join(60)
        return {"sent": sent, "worker-0": results[(g, 1)], "worker-1": results[(g, 2)]}

    return {"round_trip": generation(1, 7, (7, 7), True, 20),
            "wrong_version": generation(2, 8, (8, 9), True, 2.0),
            "never_sent": generation(3, 9, (9, 9), False, 1.0)}


def main(out: Path) -> None:
    import ray

    Run.score = digit_share  # one local cluster on loopback for every pool below (each would start its own)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    report: dict = {"transport": _transport(), "pool": _pool(out)}
    runs = {"reference": _train(out, "reference", rollout_workers=0, sync_dir=str(out / "sync-ref"))}
    runs["broadcast"] = _train(out, "broadcast", rollout_workers=2, weight_transport="broadcast", sync_timeout_s=30)
    os.environ[driver.KILL_SYNC_ENV] = "1,2,3"
    runs["killed"] = _train(out, "killed", rollout_workers=2, weight_transport="broadcast", sync_timeout_s=3)
    del os.environ[driver.KILL_SYNC_ENV]
    ref = runs["reference"]["weights"]
    for name, r in runs.items():
        w = r["weights"]
        report[name] = {
            "max_abs_diff": max(float((ref[k].float() - w[k].float()).abs().max()) for k in ref),
            "per_step": [{k: v for k, v in row.items() if k.startswith(("dist/", "sync/", "meter/version/"))}
                         for row in r["rows"]],
        }
    ray.shutdown()
    print("SCENARIO " + json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
