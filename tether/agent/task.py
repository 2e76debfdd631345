"""An environment as a run's task: episode seeds to train on, a fixed evaluation split, the warm-start data.

Training episodes start from seeds drawn per step (``sample``; below ``EVAL_SEED_BASE``); evaluation plays the
fixed seeds ``EVAL_SEED_BASE + i`` (never drawn for training). The built-in model's warm start is SFT on the
environment's scripted solver (``expert_action()``): whole expert episodes, rendered token-natively exactly as
the episode runner renders them, with the loss on the expert's action tokens only.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tether.agent.env import Env, TextEnv
from tether.agent.render import Renderer, as_env

EVAL_SEED_BASE = 1_000_000_000


@dataclass(frozen=True)
class EpisodeSpec:
    """One episode to play: the seed its environment is reset with."""
    seed: int


class EnvTask:
    """A run's environment (module docstring). ``factory(**options)`` makes a fresh environment per episode."""
    has_expert_solutions = False
    n_skipped = 0

    def __init__(self, name: str, factory: Callable[..., TextEnv | Env], options: dict[str, Any] | None = None) -> None:
        self.name, self.factory, self.options = f"env:{name}", factory, dict(options or {})
        try:
            probe = self.make()
        except TypeError as exc:
            raise ValueError(f"environment '{name}': env_options {self.options} do not fit its constructor: {exc}") from exc
        if not (callable(getattr(probe, "reset", None)) and callable(getattr(probe, "step", None))):
            raise ValueError(f"environment '{name}': the factory returned {type(probe).__name__}, which has no "
                             "reset(seed) / step(action) (tether.agent.env)")
        self.config = {"env": name, **self.options}

    def make(self) -> TextEnv | Env:
        return self.factory(**self.options)

    pool: int | None = None
    """Training seeds come from ``0..pool-1`` (tasks repeat; ``AgentConfig.task_pool``); None: from ``0..10^9-1``."""

    def sample(self, rng: random.Random) -> EpisodeSpec:
        return EpisodeSpec(rng.randrange(self.pool or EVAL_SEED_BASE))

    def eval_examples(self, n: int = 200) -> list[EpisodeSpec]:
        return [EpisodeSpec(EVAL_SEED_BASE + i) for i in range(n)]

    def reward(self, prompt: str, completion: str, answer: str) -> float:
        raise TypeError(f"{self.name}: an environment's rewards come from its step(), not a reward function")

    def warmstart_batch(self, rng: random.Random, batch_size: int, tokenizer, renderer: Renderer, *, max_turns: int,
                        max_tokens: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` expert episodes as (tokens_BT, target_mask aligned with tokens[:, 1:]): the loss is
        on the expert's action tokens (its text, then EOS), never on prompts or replies."""
        rows = [self._expert_episode(rng.randrange(EVAL_SEED_BASE), tokenizer, renderer, max_turns, max_tokens)
                for _ in range(batch_size)]
        T = max(len(t) for t, _ in rows)
        tokens = torch.full((len(rows), T), pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), T - 1, dtype=torch.bool)
        for i, (t, m) in enumerate(rows):
            tokens[i, :len(t)] = torch.tensor(t)
            mask[i, :len(t) - 1] = torch.tensor(m[1:])
        return tokens, mask

    def _expert_episode(self, seed: int, tokenizer, renderer: Renderer, max_turns: int, max_tokens: int):
        raw = self.make()
        solver = getattr(raw, "expert_action", None)
        if solver is None:
            raise ValueError(f"{self.name} has no expert_action() for the built-in model's SFT warm start; give the "
                             "environment a scripted solver or set warmstart_steps 0")
        env = as_env(raw, renderer)
        obs = env.reset(seed)
        tokens, target = list(obs.tokens), [False] * len(obs.tokens)
        cap = min(max_turns, getattr(env, "max_turns", None) or max_turns)
        for _ in range(cap):
            action = tokenizer.encode_completion(solver()) + [tokenizer.eos_id]
            if len(tokens) + len(action) > max_tokens:
                break
            tokens += action
            target += [True] * len(action)
            step = env.step(action)
            if step.done or step.observation is None or len(tokens) + len(step.observation.tokens) > max_tokens:
                break
            tokens += step.observation.tokens
            target += [False] * len(step.observation.tokens)
        return tokens, target


def build_env_task(spec: str, options: dict[str, Any] | None) -> EnvTask:
    """The task of ``--env SPEC``: a built-in environment's name or ``module:Factory`` / ``file.py:Factory``."""
    from tether.agent.envs import make_env_factory

    return EnvTask(spec, make_env_factory(spec), options)
