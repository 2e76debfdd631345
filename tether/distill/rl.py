"""Plain RL on the task reward, no teacher: the short RL run that follows SFT / PEAR in the benchmark."""

from __future__ import annotations

from tether.distill.base import Batch, Context, on_policy


class RL:
    needs_teacher = False

    def batch(self, ctx: Context, step: int, seed: int) -> Batch:
        rollout, rows, rewards = on_policy(ctx, seed)
        return Batch(rollout, rows, rewards_B=rewards)
