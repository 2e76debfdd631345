"""Reward worker pool overhead: the default job's step with its reward in-process vs in worker processes.

One run of the default job (``tether train`` defaults: arithmetic, 16 prompts x 8 completions, 12 new
tokens, the warm-started tiny model) scores every step's completions twice, side by side on the same
completions under the same machine load, in an order that alternates from step to step: once with the
built-in ``exact_match`` called in the trainer's process (what built-ins do by default), once with the
very same function imported by name in a pool of worker processes sized to the machine
(``min(cores, batch)`` workers, what a user reward gets). Both must give the same rewards; the loop
goes on with the in-process ones. Overhead = median over steps of (pool score time - in-process
score time) / (step time with one scoring) (goal: <= 5 %); the first step is left out (warm-up). A
second part times ``RewardPool.map`` on one batch of 128 calls against the plain loop, per call, the
pool's start-up (fresh interpreters importing the reward) and, for comparison, the in-process loop
with a thread timeout per call (what every reward got before the pool).

    PYTHONPATH=. python benchmarks/reward_pool.py [--steps 12] [--threads 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from tether.tasks.reward_pool import default_workers


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def side_by_side(steps: int, threads: int) -> list[dict[str, float]]:
    """Per step: seconds of the in-process and the pooled scoring, and the step with one scoring."""
    from tether.train import setup
    from tether.train.config import TrainConfig
    from tether.train.metrics_log import read_metrics
    from tether.train.scoring import Scorer
    from tether.train.sync import train

    real_score, timed, pooled = setup.score, [], {}

    def score(scorer, policy, rollout, examples, cfg):
        if "scorer" not in pooled:
            pooled["scorer"] = Scorer(scorer.task, replace(cfg, reward_workers=default_workers(rollout.batch_size)), {})
        sides = [("in_process", scorer), ("pool", pooled["scorer"])]
        out, seconds = {}, {}
        for name, s in sides if len(timed) % 2 == 0 else sides[::-1]:
            t = time.perf_counter()
            out[name] = real_score(s, policy, rollout, examples, cfg)
            seconds[name] = time.perf_counter() - t
        assert out["in_process"][0].equal(out["pool"][0]) and out["in_process"][1] == out["pool"][1]
        timed.append(seconds)
        return out["in_process"]

    setup.score = score
    try:
        with tempfile.TemporaryDirectory() as d:
            train(TrainConfig(steps=steps, threads=threads, reward_workers=0, out=d, progress=False, eval_size=10,
                              checkpoint_every=10**6))
            rows = read_metrics(Path(d) / "metrics.jsonl")
    finally:
        setup.score = real_score
        if "scorer" in pooled:
            pooled["scorer"].close()
    return [{**t, "step": r["time/step_s"] - max(t.values())} for t, r in zip(timed, rows)][1:]


def micro(batch: int, repeats: int) -> dict[str, float]:
    from tether.tasks.reward_pool import RewardCall, RewardPool
    from tether.tasks.rewards import exact_match, score

    calls = [RewardCall(f"{i}+{i}=", str(2 * i + i % 2), str(2 * i)) for i in range(batch)]
    t0 = time.perf_counter()
    pool = RewardPool("tether.tasks.rewards:exact_match", workers=default_workers(batch), timeout_s=5.0)
    try:
        pool.map(calls[:1])
        start_s = time.perf_counter() - t0
        pooled, local, threaded = [], [], []
        for _ in range(repeats):
            t = time.perf_counter()
            got = pool.map(calls)
            pooled.append(time.perf_counter() - t)
            t = time.perf_counter()
            want = [score(exact_match, c.prompt, c.completion, c.answer) for c in calls]
            local.append(time.perf_counter() - t)
            t = time.perf_counter()
            threads = [score(exact_match, c.prompt, c.completion, c.answer, timeout_s=5.0) for c in calls]
            threaded.append(time.perf_counter() - t)
            assert got == want == threads
        workers = len(pool.pids)
    finally:
        pool.close()
    return {"workers": workers, "pool_start_s": start_s, "pool_map_s": statistics.median(pooled),
            "in_process_s": statistics.median(local), "in_process_thread_timeout_s": statistics.median(threaded),
            "overhead_per_call_us": 1e6 * (statistics.median(pooled) - statistics.median(local)) / batch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12, help="steps of the default job (the first is left out)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    from tether.train.config import TrainConfig

    cfg = TrainConfig()
    batch = cfg.prompts_per_step * cfg.group_size
    load_before = load()
    steps = side_by_side(args.steps, args.threads)
    med = {k: statistics.median(s[k] for s in steps) for k in ("in_process", "pool", "step")}
    overhead = statistics.median((s["pool"] - s["in_process"]) / s["step"] for s in steps)
    result = {
        "job": f"default: {cfg.task}, {cfg.prompts_per_step} prompts x {cfg.group_size} = {batch} completions, "
               f"{cfg.max_new_tokens} new tokens, threads {args.threads}",
        "workers": default_workers(batch), "steps_timed": len(steps), "median_s": med, "overhead_of_step": overhead,
        "micro": micro(batch, repeats=20), "load_average_before": load_before, "load_average_after": load(),
    }
    print(json.dumps(result, indent=2))
    print(f"score phase {1e3 * med['in_process']:.2f} ms in-process vs {1e3 * med['pool']:.2f} ms through "
          f"{result['workers']} workers; step {1e3 * med['step']:.1f} ms: overhead {100 * overhead:+.2f} % of the step "
          f"(goal <= 5 %); load average {load_before} -> {result['load_average_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
