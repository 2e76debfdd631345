"""Tiny text environments for the agent tests (importable as ``tests.agent.toy_envs:Name``)."""

from __future__ import annotations

import random

import torch

from tether.agent.env import TextStep
from tether.rollout import SamplingParams, Source


class Copy:
    """Say the letter shown, twice in a row: turn 1's prompt shows it, turn 2's reply shows it again (a
    tool reply). Reward 0.5 per right answer; success when both are right."""
    max_turns = 2

    def __init__(self, letters: str = "ab") -> None:
        self.letters = letters

    def reset(self, seed: int) -> str:
        rng = random.Random(seed)
        self.target = [rng.choice(self.letters) for _ in range(2)]
        self.k, self.right = 0, 0
        return f"say {self.target[0]}\n"

    def expert_action(self) -> str:
        return self.target[self.k]

    def step(self, action: str) -> TextStep:
        ok = action.strip() == self.target[self.k]
        self.right += ok
        self.k += 1
        if self.k == 2:
            return TextStep(None, 0.5 * ok, True, {"success": self.right == 2})
        return TextStep(f"\nsay {self.target[1]}\n", 0.5 * ok, False, {}, source=Source.TOOL)


class NoSolver:
    """Copy without a scripted solver (no ``expert_action``)."""
    max_turns = 2

    def __init__(self) -> None:
        self.inner = Copy()

    def reset(self, seed: int) -> str:
        return self.inner.reset(seed)

    def step(self, action: str) -> TextStep:
        return self.inner.step(action)


class Tok:
    """Character ids: 'a'..'z' -> 1..26, newline 27, space 28, EOS 29."""
    eos_id, pad_id = 29, 0
    chars = "abcdefghijklmnopqrstuvwxyz\n "

    def encode(self, text):
        return [self.chars.index(c) + 1 for c in text]

    encode_completion = encode

    def decode(self, ids):
        return "".join(self.chars[i - 1] for i in ids if 0 < i < 29)


class ZEngine:
    """Always samples 'z' then EOS (a student that never solves Copy), log mu -0.5 per token."""
    vocab_size, pad_id = 30, 0

    def generate(self, prompts, params, *, seed=0, group_B=None):
        from tether.rollout import Rollout

        B = len(prompts)
        T = max(len(p) for p in prompts) + 2
        tokens = torch.zeros(B, T, dtype=torch.long)
        logp = torch.zeros(B, T)
        for i, p in enumerate(prompts):
            tokens[i, :len(p) + 2] = torch.tensor(p + [26, 29])
            logp[i, len(p):len(p) + 2] = -0.5
        return Rollout(tokens_BT=tokens, prompt_len_B=torch.tensor([len(p) for p in prompts]),
                       completion_len_B=torch.full((B,), 2), logp_mu_BT=logp,
                       version_BT=torch.zeros(B, T, dtype=torch.long), sampling=params)


def scripted_episodes(mask):
    """Copy episodes (seeds 0..E-1, one group each) of ZEngine with the scripted teacher acting where ``mask``."""
    from tether.agent.dagger import ScriptedTeacher
    from tether.agent.episodes import run_episodes
    from tether.agent.render import PlainRenderer, as_env

    tok = Tok()
    envs = [as_env(Copy(), PlainRenderer(tok)) for _ in range(mask.shape[0])]
    return run_episodes(ZEngine(), envs, list(range(mask.shape[0])), SamplingParams(max_new_tokens=2),
                        group_B=torch.arange(mask.shape[0]), seed_fn=lambda k, c: 0, max_turns=2,
                        max_episode_tokens=100, teacher=ScriptedTeacher(tok, mask))
