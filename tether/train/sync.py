"""The synchronous RL driver, top to bottom: generate, then train, in one thread.

    for step s:  prompts (seed, s) -> engine.generate (seed, s, 1): log mu, versions, truncation -> score
                 -> Run.learn (pi_old, advantages, meter, mismatch control, update; run.py)
                 -> weights to the engine (version s + 1) -> log -> checkpoint when due

What a step computes lives in ``run.py``; this file only schedules it. A resumed run is bitwise identical
to an uninterrupted one on CPU (run.py says why).
"""

from __future__ import annotations

from typing import Any

from tether.train.config import TrainConfig
from tether.train.errors import TrainingStopped
from tether.train.progress import Stopwatch
from tether.train.run import Given, Run, RunState
from tether.train.seeds import step_seed

__all__ = ["RunState", "TrainingStopped", "step_seed", "train"]


def train(cfg: TrainConfig, given: Given | None = None) -> dict[str, Any]:
    """Run ``cfg`` to the end; ``given``: objects in place of names (``tether.Trainer``)."""
    with Run(cfg, given=given, name=f"{cfg.task_stem}-{cfg.objective}-{cfg.seed}") as run:
        run.start()
        with run.progress() as progress:
            while run.state.step < cfg.steps:
                s = run.state.step
                clock = Stopwatch()
                # the engine samples (log mu, versions, truncation), then the reward or the environment scores:
                # failed reward calls count and get 0
                batch = run.collect(run.sample(s), seed_fn=lambda c, s=s: step_seed(cfg.seed, s, 1 if c == 0 else 1000 + c))
                batch.step = s
                clock.add("rollout", batch.metrics.pop("time/rollout_s"))
                clock.add("score", batch.metrics.pop("time/score_s"))
                metrics = run.learn(batch, clock, progress.console)
                with clock("sync"):  # the next rollout is version s + 1
                    run.engine.load_weights(run.full_state()[0], version=run.state.step)
                run.record(metrics, batch, clock, progress)
                run.checkpoint_if_due()  # and a clean stop after a SIGINT / SIGTERM
        return run.finish()
