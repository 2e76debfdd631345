"""The agent's part of a shared run (``tether.train.run.Run`` with ``env`` set): what changes when a step's
samples are multi-turn episodes instead of single completions. Nothing else does: the drivers, the meter, the
mismatch control, the presets and the update are the same code.

* **collect**: ``group_size`` episodes per sampled seed (a GRPO group: one initial state), through
  :func:`tether.agent.episodes.run_episodes`; rows keep per-token provenance, so the loss mask is the policy's
  tokens and every version a token was sampled at is recorded (async: later turns may be newer weights).
* **advantages**: the configured turn-level credit (``AgentConfig.credit``): ``episode`` is the preset's own
  advantage estimator on episode returns, on every turn; the others are ``tether.agent.credit``'s estimators on
  per-turn rewards, broadcast to each turn's action tokens. A KL-in-reward term is added to an episode's last
  turn.
* **fission** (``AgentConfig.fission`` = G'): one failed episode per group forked at its failing step, G'
  continuations from that state as one more group (``tether.agent.fission``); training collects only.
* **evaluate**: greedy episodes on the fixed evaluation seeds; the success rate is the run's accuracy.
* **metrics**: outcomes, turns, success, token shares per source (``EpisodeBatch.metrics``), and every
  ``drift_every`` steps the tokenisation-drift meter where the environment keeps its messages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from tether.agent.episodes import EpisodeBatch, broadcast_turns, run_episodes
from tether.agent.render import PlainRenderer, Renderer, as_env
from tether.agent.task import EnvTask, EpisodeSpec
from tether.rollout import Rollout, SamplingParams, Source


def renderer_for(policy: Any, cfg: Any) -> Renderer:
    """The chat template where the tokenizer has one (and ``chat_template`` is not False), else plain text."""
    hf = getattr(policy.tokenizer, "hf", None) or getattr(policy.tokenizer, "tokenizer", None)
    has_template = getattr(hf, "chat_template", None) is not None
    if has_template and cfg.chat_template is not False:
        from tether.agent.render import ChatRenderer

        return ChatRenderer(policy.tokenizer)
    return PlainRenderer(policy.tokenizer)


class Episodes:
    """The agent part of one run (module docstring)."""

    def __init__(self, cfg: Any, task: EnvTask, policy: Any) -> None:
        self.cfg, self.a, self.task, self.policy = cfg, cfg.agent, task, policy
        self.renderer = renderer_for(policy, cfg)
        limit = getattr(policy.engine, "max_len", None)
        self.max_episode_tokens = min(x for x in (self.a.max_episode_tokens, limit) if x is not None) \
            if (self.a.max_episode_tokens or limit) else 1 << 30
        self.credit_fn = None
        from tether.train.setup import sampling_params

        self.sampling = sampling_params(cfg)
        if self.a.algorithm == "bepa":
            from tether.agent.bepa import TrajectoryCache

            self.cache = TrajectoryCache(self.a.bepa_cache_size)
        if self.a.algorithm == "dagger":
            from tether.agent.dagger import Aggregate

            self.aggregate = Aggregate()
        if self.a.dart_reuse:
            from tether.agent.bepa import TrajectoryCache

            self.cache = TrajectoryCache(self.a.bepa_cache_size)
        self.history = None
        if self.a.dart_adaptive:
            from tether.agent.dart import SuccessHistory

            self.history = SuccessHistory(self.a.dart_window)
        self.train_seeds: list[int] = []  # the episode seed of every row of the last training collect
        self.has_solver = callable(getattr(task.make(), "expert_action", None))
        if self.a.algorithm == "dagger" and self.a.dagger_teacher == "scripted" and not self.has_solver:
            raise ValueError(f"{task.name} has no scripted solver (expert_action()) for --dagger-teacher scripted; "
                             "give the environment one or use a model teacher (--dagger-teacher builtin or PATH)")
        self.teacher_engine = self._teacher_engine()
        if self.a.credit != "episode":
            from tether.agent.credit import CREDIT

            self.credit_fn = CREDIT[self.a.credit]

    def teacher(self, step: int, n_episodes: int):
        """DAgger's mixture teacher for step ``step`` (``beta_step``, one seeded draw per episode and turn);
        None for the other algorithms."""
        if self.a.algorithm != "dagger":
            return None
        from tether.agent.dagger import ScriptedTeacher, beta_schedule, mixture_mask
        from tether.train.seeds import step_seed

        beta = beta_schedule(step, self.a.dagger_beta, self.a.dagger_beta_decay)
        mask = mixture_mask(beta, n_episodes, self.a.max_turns, step_seed(self.cfg.seed, step, 7))
        if self.teacher_engine is not None:
            from tether.agent.dagger import ModelTeacher

            return ModelTeacher(self.teacher_engine, self.cfg.max_new_tokens, mask)
        return ScriptedTeacher(self.policy.tokenizer, mask)

    def _teacher_engine(self):
        """The engine of a model teacher (``dagger_teacher`` builtin or a model directory); None: scripted."""
        which = self.a.dagger_teacher
        if self.a.algorithm != "dagger" or which == "scripted":
            return None
        from tether.engine.torch_engine import TorchEngine

        tok = self.policy.tokenizer
        if which == "builtin":
            from tether.models import builtin

            model, _ = builtin.warm_started_tiny(self.task, seed=self.cfg.seed + 1, steps=self.a.dagger_teacher_steps,
                                                 max_turns=self.a.max_turns, label="teacher warm start")
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(which)
        vocab = getattr(model.config, "vocab_size", None)
        if vocab is not None and vocab < self.policy.engine.vocab_size:
            raise ValueError(f"config field 'dagger_teacher': the teacher's vocabulary ({vocab}) is smaller than "
                             f"the student's ({self.policy.engine.vocab_size}); it must share the student's tokenizer")
        model = model.to(self.cfg.device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return TorchEngine(model, eos_id=tok.eos_ids, pad_id=tok.pad_id)

    def train_batch(self, ep: EpisodeBatch, specs: list[EpisodeSpec], step: int
                    ) -> tuple[EpisodeBatch, Rollout, Tensor, dict[str, float]]:
        """What the update trains on, from the step's episodes: (episodes, rollout, rewards, metrics). RL: the
        episodes' own rows and returns; bepa: the same after the cache's injection; dagger: a sample of the
        aggregate of teacher-labelled states (``tether.agent.dagger``), rewards 0 (the SFT loss reads none)."""
        from tether.train.seeds import step_seed

        algo = self.a.algorithm
        engine = self.policy.engine
        if algo == "bepa" or self.a.dart_reuse:
            from tether.agent.bepa import assimilate

            keys = list(self.train_seeds)
            # no solver (or DART's reuse): the policy's own successes only
            seed_fn = self._expert_episode if self.has_solver and algo == "bepa" else None
            ep, out = assimilate(ep, keys, self.cache, seed_fn, pad_id=engine.pad_id,
                                 vocab_size=engine.vocab_size)
            if algo != "bepa":
                out = {"dart/reuse_" + k.removeprefix("bepa/"): v for k, v in out.items()}
            return ep, ep.rollout, ep.returns_E, out
        if algo == "dagger":
            from tether.agent.dagger import label_rows, sft_rollout

            self.aggregate.add(label_rows(ep))
            rows = self.aggregate.sample(self.a.dagger_rows, step_seed(self.cfg.seed, step, 8))
            rollout = sft_rollout(rows, pad_id=engine.pad_id, vocab_size=engine.vocab_size, version=step,
                                  params=self.sampling)
            teacher_frac = float((ep.rollout.sources_BT == Source.TEACHER).sum()) / max(
                int(((ep.rollout.sources_BT == Source.TEACHER) | ep.rollout.loss_mask_BT).sum()), 1)
            out = {"dagger/beta": self._beta(step), "dagger/aggregate_rows": float(len(self.aggregate.rows)),
                   "dagger/trained_rows": float(len(rows)), "dagger/teacher_token_frac": teacher_frac}
            return ep, rollout, torch.zeros(rollout.batch_size), out
        return ep, ep.rollout, ep.returns_E, {}

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the agent algorithm: DAgger's aggregate, BEPA's cache (plain data)."""
        if self.a.algorithm == "dagger":
            return {"dagger": self.aggregate.state_dict()}
        out = {}
        if self.a.algorithm == "bepa" or self.a.dart_reuse:
            out["bepa"] = self.cache.state_dict()
        if self.history is not None:
            out["dart_history"] = self.history.state_dict()
        return out

    def load_state_dict(self, sd: dict) -> None:
        if "dagger" in sd:
            self.aggregate.load_state_dict(sd["dagger"])
        if "bepa" in sd:
            self.cache.load_state_dict(sd["bepa"], self.sampling)
        if "dart_history" in sd and self.history is not None:
            self.history.load_state_dict(sd["dart_history"])

    def select_steps(self, rollout: Rollout, entropy_BT: Tensor | None) -> tuple[Rollout, dict[str, float]]:
        """DART's high-entropy step selection (``dart_entropy_top``; ``tether.agent.dart.entropy_selection``): the
        rollout the update trains on; ``rollout`` itself when the switch is off."""
        if self.a.dart_entropy_top is None:
            return rollout, {}
        if entropy_BT is None:
            raise ValueError("dart_entropy_top: this step computed no entropy (old_logits loglinear)")
        from tether.agent.dart import entropy_selection

        return entropy_selection(rollout, entropy_BT, self.a.dart_entropy_top)

    def rollout_counts(self, specs: list[EpisodeSpec]) -> list[int]:
        """Episodes per spec of a training step: ``group_size`` each, or with ``dart_adaptive`` DART's
        allocation by recent success rate (``tether.agent.dart.allocate_rollouts``; the total is unchanged)."""
        g = self.cfg.group_size
        if self.history is None:
            return [g] * len(specs)
        from tether.agent.dart import allocate_rollouts

        hi = self.a.dart_max_rollouts if self.a.dart_max_rollouts is not None else 2 * g
        return allocate_rollouts([self.history.rate(spec.seed) for spec in specs], g * len(specs),
                                 self.a.dart_min_rollouts, hi)

    @staticmethod
    def meter_rows(rollout: Rollout) -> Rollout:
        """``rollout`` with its teacher tokens scored too (``token_logprobs`` scores the loss mask only): what
        ``agent/mismatch/teacher/...`` reads when the update trains on other rows (DAgger)."""
        src = rollout.sources_BT
        return replace(rollout, source_BT=torch.where(src == Source.TEACHER, torch.full_like(src, int(Source.POLICY)), src))

    def _beta(self, step: int) -> float:
        from tether.agent.dagger import beta_schedule

        return beta_schedule(step, self.a.dagger_beta, self.a.dagger_beta_decay)

    def _expert_episode(self, seed: int) -> EpisodeBatch:
        """The scripted solver's episode from ``seed`` (acting at every turn; BEPA's LEVEL-1 seeding)."""
        from tether.agent.dagger import ScriptedTeacher

        always = torch.ones(1, self.a.max_turns, dtype=torch.bool)
        env = as_env(self.task.make(), self.renderer)
        return run_episodes(self.policy.engine, [env], [seed], self.sampling, group_B=torch.zeros(1, dtype=torch.long),
                            seed_fn=lambda k, c: 0, max_turns=self.a.max_turns,
                            max_episode_tokens=self.max_episode_tokens,
                            teacher=ScriptedTeacher(self.policy.tokenizer, always))

    def envs(self, specs: list[EpisodeSpec], copies: int | list[int]) -> tuple[list, list[int], Tensor]:
        """Environments, seeds and group ids of ``copies`` episodes per spec (one count, or one per spec)."""
        counts = [copies] * len(specs) if isinstance(copies, int) else list(copies)
        seeds = [spec.seed for spec, n in zip(specs, counts) for _ in range(n)]
        envs = [as_env(self.task.make(), self.renderer) for _ in seeds]
        return envs, seeds, torch.arange(len(specs)).repeat_interleave(torch.tensor(counts, dtype=torch.long))

    def collect(self, specs: list[EpisodeSpec], params: SamplingParams, *, seed_fn: Callable[[int, int], int],
                before_chunk: Callable[[int], None] | None = None, chunk_tokens: int | None = None,
                copies: int | None = None, step: int | None = None) -> EpisodeBatch:
        """``group_size`` episodes per spec (``copies`` instead: evaluation, never forked); turn k, chunk c sampled
        with ``seed_fn(k, c)``; with ``fission`` set, the forked groups after them. ``step``: a training step's
        episodes (DAgger's mixture teacher acts on some turns); None: the student alone."""
        counts = self.rollout_counts(specs) if copies is None else copies
        envs, seeds, group_B = self.envs(specs, counts)
        teacher = None if step is None else self.teacher(step, len(envs))

        def play(envs, seeds, group_B, replays=None, chunk0=0, teacher=None):
            return run_episodes(self.policy.engine, envs, seeds, params, group_B=group_B,
                                seed_fn=lambda k, c: seed_fn(k, chunk0 + c), max_turns=self.a.max_turns,
                                max_episode_tokens=self.max_episode_tokens, before_turn=before_chunk,
                                chunk_tokens=chunk_tokens, replays=replays, teacher=teacher)

        batch = play(envs, seeds, group_B, teacher=teacher)
        if copies is None:
            self.train_seeds = list(seeds)
            if self.history is not None:  # DART's success history: the sampled episodes (forks not counted)
                for seed, ok in zip(seeds, batch.success_E.tolist()):
                    self.history.add(seed, ok)
        if self.a.fission is None or copies is not None:
            return batch
        from tether.agent.fission import FISSION_CHUNK, fission

        def fork(fork_seeds, replays, fork_groups):
            fork_envs = [as_env(self.task.make(), self.renderer) for _ in fork_seeds]
            return play(fork_envs, fork_seeds, fork_groups, replays, FISSION_CHUNK)

        engine = self.policy.engine
        return fission(batch, seeds, self.a.fission, fork, pad_id=engine.pad_id, vocab_size=engine.vocab_size)

    def evaluate(self) -> float:
        """Greedy success rate on the first ``eval_size`` evaluation seeds."""
        greedy = SamplingParams(temperature=1.0, top_k=1, max_new_tokens=self.cfg.max_new_tokens)
        batch = self.collect(self.task.eval_examples(self.cfg.eval_size), greedy, seed_fn=lambda k, c: 0, copies=1)
        return float(batch.success_E.float().mean())

    def advantages(self, ep: EpisodeBatch, rewards_B: Tensor, advantage_fn, include_B: Tensor | None
                   ) -> tuple[Tensor, Tensor]:
        """(per-row advantage for the logs, per-token advantages on the policy tokens). ``rewards_B`` is the
        episode return after the run's shaping (a KL-in-reward term); the shaping goes to each episode's last turn."""
        group_B = ep.rollout.group_B
        if self.credit_fn is None:
            adv_B = advantage_fn(rewards_B, group_B, include_B)
            return adv_B, adv_B[:, None] * ep.rollout.loss_mask_BT
        rewards_EK = ep.rewards_EK.clone()
        last_E = ep.turn_mask_EK.sum(dim=1) - 1
        extra = rewards_B - ep.returns_E.to(rewards_B.dtype)
        rewards_EK[torch.arange(len(last_E)), last_E] += extra.to(rewards_EK.dtype)
        adv_EK = self.credit_fn(rewards_EK, ep.turn_mask_EK, group_B, ep.state_EK, gamma=self.a.gamma,
                                omega=self.a.gigpo_omega, baseline=self.a.credit_baseline)
        first = adv_EK[:, 0]
        return first, broadcast_turns(adv_EK, ep.rollout)

    def metrics(self, ep: EpisodeBatch, step: int, model: torch.nn.Module, logp_BT: Tensor | None
                ) -> dict[str, Any]:
        """The batch's episode metrics; the mismatch of each source and each turn (``logp_BT``: the trainer's
        log-probs, None when the step computed none); every ``drift_every`` steps the tokenisation drift."""
        from tether.agent.drift import (
            drift_metrics,
            mismatch_by_source,
            mismatch_by_turn,
            model_logprob_fn,
            transcripts,
        )

        out: dict[str, Any] = ep.metrics()
        r = ep.rollout
        if self.history is not None:  # DART's adaptive counts: the group sizes this step played
            sizes = torch.bincount(r.group_B[~ep.fission_B] if ep.fission_B is not None else r.group_B)
            sizes = sizes[sizes > 0]
            out.update({"dart/rollouts_min": float(sizes.min()), "dart/rollouts_max": float(sizes.max()),
                        "dart/tasks_tracked": float(len(self.history.seen))})
        if logp_BT is not None:
            out.update(mismatch_by_source(r, logp_BT, r.logp_mu_BT))
            out.update(mismatch_by_turn(r, logp_BT, r.logp_mu_BT))
        every = self.a.drift_every
        ts = transcripts(ep) if every and step % every == 0 else []
        if ts:
            with torch.no_grad():
                out.update(drift_metrics(ts, self.renderer.rerender, model_logprob_fn(model, self.policy.engine.pad_id)))
        return out
