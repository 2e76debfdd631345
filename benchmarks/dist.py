"""Scale-out figures for docs/benchmarks.md (issue 16): Ray start-up cost, samples/s with 1 vs 2 rollout
workers (and 0: the worker in the trainer's process, no Ray), samples/s with 1 vs 2 sharded trainer ranks
(FSDP2 over gloo, the worker in the trainer's process), and filesystem weight sync time per MB.

    python benchmarks/dist.py --steps 4 [--prompts 8 --group 4 --sync-mb 8 64] [--ranks-only]

Needs ray and safetensors (``pip install -e '.[dist]'``); ``--ranks-only`` needs only safetensors (no Ray: just
the trainer-rank figures). Run it inside a network namespace with only
loopback, as the tests do: ``unshare -rn --pid --fork --kill-child --mount-proc sh -c 'ip link set lo up &&
exec python benchmarks/dist.py'``. Prints one JSON line. samples/s = rows generated and trained per second
of the training loop (rollout + score + learn + sync), excluding start-up and evaluation.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def ray_startup() -> dict[str, float]:
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    t1 = time.perf_counter()

    @ray.remote(num_cpus=1)
    class Ping:
        def ping(self) -> int:
            return 1

    ray.get(Ping.remote().ping.remote())
    t2 = time.perf_counter()
    ray.shutdown()
    return {"ray_init_s": t1 - t0, "first_actor_s": t2 - t1, "shutdown_s": time.perf_counter() - t2}


def samples_per_s(workers: int, steps: int, prompts: int, group: int, out: Path, ranks: int = 1) -> dict:
    """Rows per second of the step loop, and the mean seconds per step of the update phase alone."""
    from tether.dist import driver
    from tether.train.config import TrainConfig

    name = f"w{workers}-r{ranks}"
    cfg = TrainConfig.from_flat(mode="dist", rollout_workers=workers, trainer_ranks=ranks, steps=steps,
                                prompts_per_step=prompts, group_size=group, warmstart_steps=0, eval_size=4, threads=1,
                                progress=False, checkpoint_every=steps, out=str(out / name))
    driver.train(cfg)
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    return {"samples_per_s": steps * prompts * group / sum(r["time/step_s"] for r in rows),
            "update_s": sum(r["time/update_s"] for r in rows) / len(rows)}


def sync_per_mb(mb: int, out: Path) -> dict[str, float]:
    import torch

    from tether.dist.transport import FilesystemTransport

    t = FilesystemTransport(out / f"sync{mb}")
    state = {f"w{i}": torch.randn(mb * 2**20 // 4 // 8) for i in range(8)}
    sent = t.publish(state, 0)
    _, got = t.receive(0, timeout_s=60, receiver="bench")
    size_mb = sent.bytes / 2**20
    return {"mb": size_mb, "publish_s_per_mb": sent.seconds / size_mb, "receive_s_per_mb": got.seconds / size_mb}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--sync-mb", type=int, nargs="+", default=[8, 64])
    p.add_argument("--ranks-only", action="store_true", help="only 1 vs 2 trainer ranks (no Ray)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        report = {"trainer_ranks": {r: samples_per_s(0, a.steps, a.prompts, a.group, out, ranks=r) for r in (1, 2)}}
        if not a.ranks_only:
            report.update({
                "ray_startup": ray_startup(),
                "samples_per_s": {w: samples_per_s(w, a.steps, a.prompts, a.group, out)["samples_per_s"]
                                  for w in (0, 1, 2)},
                "sync": [sync_per_mb(mb, out) for mb in a.sync_mb]})
    print(json.dumps(report))


if __name__ == "__main__":
    main()
