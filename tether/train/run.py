"""The shared RL run: everything one run builds and everything one step computes, written once.

A driver (``sync.py``, ``async_loop.py``, later a distributed or multi-turn one) owns only scheduling:
when and where rollouts are generated and scored, and when weights reach the engine. It hands each step's
scored rollouts to :meth:`Run.learn`, which runs the step's stages in this order:

    class-wise reward (class_bounds; classwise.py) -> expert rows (CalibRL / RL-PLUS) -> shaping (overlong
    penalty) -> pi_old / the old-logit anchor (+ pi_ref) -> expert baseline -> the PI-controlled KL coefficient
    (kl_target) -> KL in the reward
    -> dynamic sampling -> advantages (the preset's estimator, or --advantage) x staleness weights
    -> meter -> mismatch control (budget actions, auto correction: this step's objective arguments)
    -> update phase (update.py) -> LR schedule or a counted non-finite step -> version + 1

Around it the run builds the task, policy, engine, optimiser and loggers, restores a checkpoint, evaluates,
writes checkpoints and the summary. Every random draw of step ``s`` comes from generators seeded by
(seed, s, salt) (``seeds.step_seed``) and the checkpoint holds model, optimiser, scheduler, run state and the
old-logit strategy's state, so a resumed run is bitwise identical to an uninterrupted one on CPU.
"""

from __future__ import annotations

import itertools
import math
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tether.agent.episodes import EpisodeBatch
from tether.configs import to_dict
from tether.engine.partial import generate_partial
from tether.objectives import get_preset
from tether.objectives.advantages import STATEFUL_ADVANTAGES, advantage_metrics, get_advantage
from tether.objectives.kl import check_kl_combination
from tether.rollout import Rollout
from tether.tasks.base import Example
from tether.train import setup
from tether.train.classwise import ClasswiseReward, KLCoefController, RankEmaAdvantage, measured_kl
from tether.train.config import AsyncConfig, KLPlacement, OldLogits, TrainConfig
from tether.train.errors import TrainingStopped
from tether.train.expert import expert_rows_for, on_policy_rows
from tether.train.loggers import open_loggers
from tether.train.metrics_log import MetricsLog
from tether.train.mismatch_control import MismatchControl
from tether.train.old_logits import OldLogitSource
from tether.train.progress import Reporter, StepProgress, Stopwatch
from tether.train.requirements import check_requirements, needs_expert_rows
from tether.train.run_dir import open_run_dir
from tether.train.scoring import Scorer, reward_terms
from tether.train.seeds import step_seed
from tether.train.shaping import informative_groups, soft_overlong_penalty
from tether.train.signals import StopOnSignal
from tether.train.summary import write_summary
from tether.train.update import update_phase


@dataclass
class RunState:
    """What the checkpoint carries besides the tensors (plain values, JSON-able)."""
    step: int = 0
    bad_steps: int = 0
    accuracy_before: float | None = None
    counters: dict[str, int] = field(default_factory=lambda: {"reward_failed": 0, "skipped_steps": 0, "dropped_groups": 0})
    mismatch_control: dict[str, float] = field(default_factory=dict)
    classwise: dict[str, float] = field(default_factory=dict)
    """The class-wise reward's multipliers, the rank_ema advantage's EMA and the KL controller (classwise.py)."""


@dataclass
class Given:
    """Objects a Python caller hands a run instead of names in its config (``tether.Trainer``): a task (a dataset
    already parsed, with its rewards), a transformers model with its tokenizer, callbacks. ``callbacks`` are
    objects with any of ``on_step_end(metrics)``, ``on_evaluate(when, value)``, ``on_save(step, path)``,
    ``on_run_end(policy)``."""
    task: Any = None
    model: torch.nn.Module | None = None
    tokenizer: Any = None
    rewards: list[tuple[Any, float]] | None = None
    """(callable or reward name, weight) pairs replacing ``cfg.reward`` (``reward_funcs`` / ``reward_weights``)."""
    callbacks: list[Any] = field(default_factory=list)

    def notify(self, event: str, *args: Any) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, event, None)
            if fn is not None:
                fn(*args)


@dataclass
class Batch:
    """One step's scored rollouts, as a driver hands them to :meth:`Run.learn`."""
    step: int
    rollout: Rollout
    rewards_B: Tensor
    failed: int
    """Reward calls that failed (scored 0)."""
    scored: int | None = None
    """Samples scored for this batch, each by every reward (the async drop refill adds its own); None: one per
    row."""
    failed_by_reward: dict[str, int] | None = None
    """``failed`` per reward name (several rewards); None: all of the run's one reward."""
    examples: list[Example] | None = None
    """The step's examples (the expert rows of CalibRL / RL-PLUS are built from them)."""
    keep_B: Tensor | None = None
    """Rows to train on (the driver's staleness policy); None: all."""
    weight_BT: Tensor | None = None
    """Per-token advantage multiplier (downweighted stale tokens); None: 1."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """The driver's own measurements of this step (waits, staleness counts), logged with it."""
    episodes: EpisodeBatch | None = None
    """Multi-turn episodes (``env`` set): per-turn rewards, turn masks and states for the turn-level credit;
    ``rollout`` is ``episodes.rollout`` and ``rewards_B`` the episode returns."""


class Run:
    """One RL run (module docstring), used as ``with Run(cfg) as run:``. ``name`` is the default run directory's
    stem. Entering it locks and prepares the run directory (run_dir.py: refused when another process holds it,
    or when it holds another run and neither resume nor overwrite is set; config.json written first) and turns
    SIGINT / SIGTERM into a clean stop at the next step boundary (signals.py); leaving it releases both.

    Sharded trainer ranks (``dist.trainer_ranks > 1``, tether/dist/ranks.py): rank 0's run starts the other ranks
    and shards the model over them; a follower's run (``ranks`` given, rank > 0) has no run directory, loggers or
    rewards, and runs the methods rank 0 names (:meth:`follow`) on the same inputs, so every collective is
    entered by every rank in the same order. The methods that touch the sharded model announce themselves
    (``_lead``): :meth:`learn`, :meth:`full_state`, :meth:`policy_logprobs` and the restore in :meth:`start`."""

    def __init__(self, cfg: TrainConfig, *, name: str | None = None, ranks: Any = None,
                 given: Given | None = None) -> None:
        self.cfg = cfg
        self.given = given or Given()
        self.ranks = ranks
        self.follower = ranks is not None and not ranks.leader
        self._stack = ExitStack()
        try:
            self._build(name)
        except BaseException:
            self._stack.close()
            raise

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def _build(self, name: str | None) -> None:
        cfg = self.cfg
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        if self.follower:  # rank 0 owns the run directory, the signals and the logs
            self.dir, self.run_dir, self.log = None, None, _NoLog()
            self.reporter = Reporter(enabled=False)
        else:
            # the run directory first: locked, checked, config.json written, and (on resume) the reward module it
            # will import named before the task imports it
            self.dir = self._stack.enter_context(open_run_dir(cfg, f"runs/{name or Path(cfg.task).stem}"))
            self.run_dir = self.dir.path
            self.interrupt = self._stack.enter_context(StopOnSignal(self.run_dir))
            self.reporter = Reporter(enabled=cfg.progress and not cfg.quiet, log_every=cfg.log_every,
                                     log_path=self.run_dir / "progress.log")
            if cfg.dist is not None and cfg.dist.trainer_ranks > 1:  # start the other trainer ranks early
                from tether.dist.ranks import lead

                self.ranks = lead(cfg, self.run_dir)
                self._stack.callback(self.ranks.close)
        self.preset = get_preset(cfg.objective)
        self.objective_args = self.preset.resolve(cfg.objective_args)  # validate overrides before any compute
        adv = cfg.advantage or self.preset.advantage  # --advantage overrides the preset
        state = lambda: self.state.classwise  # noqa: E731 (read at each call: a resume replaces self.state)
        self.advantage_fn = RankEmaAdvantage(cfg, state) if adv in STATEFUL_ADVANTAGES else get_advantage(adv)
        self.class_reward = ClasswiseReward(cfg, state) if cfg.classwise is not None else None
        if self.class_reward is not None and needs_expert_rows(self.preset):
            raise ValueError(f"config field 'class_bounds' cannot be combined with objective {cfg.objective!r}: its "
                             "expert rows are scored by the task's reward, not the class-wise one")
        self.kl_control = KLCoefController(cfg.kl, state) if cfg.kl is not None and cfg.kl.target is not None else None
        if cfg.kl is not None:
            check_kl_combination(cfg.kl.estimator, cfg.kl_placement.value)

        self.task = setup.with_drafts(self.given.task, cfg) if self.given.task is not None else setup.build_task(cfg)
        # every reward loaded (a bad name, module or signature stops here, before any model is built)
        self.reward_terms = None if cfg.env is not None else reward_terms(self.task, cfg, self.given.rewards)
        check_requirements(self.preset, cfg, self.task)  # refuse a preset this run cannot feed, before any model
        self.policy = setup.build_policy(cfg, self.task, self.reporter, self.given.model, self.given.tokenizer)  # model, tokenizer, engine (its own copy of the weights)
        self.model, self.engine = self.policy.model, self.policy.engine
        self._stack.callback(self.engine.close)  # on every exit path (a vLLM server stops with the run)
        self.experts = expert_rows_for(self.preset, cfg, self.task, self.policy)  # CalibRL / RL-PLUS; else a no-op
        self.episodes = None  # multi-turn episodes in an environment (tether.agent.loop)
        if cfg.env is not None:
            from tether.agent.loop import Episodes

            self.episodes = Episodes(cfg, self.task, self.policy)
        if self.ranks is not None:
            self.ranks.share_weights(self.model)  # rank 0's initial weights everywhere, before the reference copy
        self.ref_model = setup.frozen_copy(self.model) if cfg.kl is not None else None
        if self.ranks is not None:
            self.ranks.shard(self.model)  # FSDP2: before the optimiser, which then holds each rank's shards
        self.alp = setup.build_alp(cfg, self.model)  # ALP's hooks: on the trainer's model only, after every copy
        self.optimizer, self.scheduler = setup.build_optimizer(
            cfg, self.model, self.alp.param_groups(cfg.perturb.lr) if self.alp is not None else None)
        a = cfg.async_ or AsyncConfig()  # sync: recompute, which keeps no versions and ignores the rest
        self.old_logits = OldLogitSource(cfg.old_logits, self.model, self.logprobs,
                                         keep_versions=max(a.lag, a.max_staleness) + 1, ewma_beta=a.ewma_beta)
        self.sampling = setup.sampling_params(cfg)
        self.state = RunState()
        self.rewards = None  # start() opens the scorer (rank 0 scores; a follower never does)
        self.tokens_total = 0
        self.last_checkpoint: int | None = None

    # -- start and end -------------------------------------------------------------------------------
    def start(self) -> dict[str, Any] | None:
        """Restore the newest intact checkpoint (when resuming), open the loggers and the mismatch control,
        evaluate before training. Returns the checkpoint (the driver reads its own part) or None."""
        cfg = self.cfg
        ckpt = self.dir.load_checkpoint()
        self.restore(ckpt)
        # the reward's worker processes, failure counts per reward and the all-failed stop rule (closed with the run);
        # an environment scores its own episodes
        self.rewards = None if self.episodes else self._stack.enter_context(Scorer(self.task, cfg, self.state.counters,
                                                                                       self.reward_terms))
        self.engine.load_weights(self.full_state()[0], version=self.state.step)
        self.log = open_loggers(cfg, self.run_dir, MetricsLog(self.run_dir / "metrics.jsonl",
                                                              resume_after_step=self.state.step - 1 if ckpt else None))
        if self.state.accuracy_before is None:
            self.state.accuracy_before = self.evaluate("before training")
            self.log.eval_point(0, self.state.accuracy_before)
        self.t_start = time.perf_counter()
        return ckpt

    def restore(self, ckpt: dict[str, Any] | None) -> None:
        """The checkpoint's tensors and run state (None: a fresh run), and the mismatch control over that state.
        Sharded: rank 0 sends everything but the model and optimiser, whose shards come from its full tensors."""
        tensors = ("model", "optimizer")
        self._lead("restore", None if ckpt is None else {k: v for k, v in ckpt.items() if k not in tensors})
        if ckpt is not None:
            if self.ranks is None:
                self.model.load_state_dict(ckpt["model"])
                self.optimizer.load_state_dict(ckpt["optimizer"])
            else:
                with self._collective("restoring the checkpoint"):
                    self.ranks.load_full_state(self.model, self.optimizer, ckpt.get("model"), ckpt.get("optimizer"))
            self.scheduler.load_state_dict(ckpt["scheduler"])
            if self.ref_model is not None:
                self.ref_model.load_state_dict(ckpt["ref_model"])
            self.state = RunState(**ckpt["run_state"])
            if self.alp is not None:
                self.alp.load_state_dict(ckpt["alp"])
            self.last_checkpoint = self.state.step
            self.old_logits.load_state_dict(ckpt["old_logits"])
            if self.episodes is not None:  # DAgger's aggregate, BEPA's cache
                self.episodes.load_state_dict(ckpt.get("agent", {}))
        else:
            self.old_logits.publish(0)
        self.control = MismatchControl(self.cfg, self.objective_args, self.state.mismatch_control, self.state.counters)

    # -- sharded trainer ranks -----------------------------------------------------------------------
    def _lead(self, name: str, payload: Any = None) -> None:
        """Rank 0 of sharded ranks: tell the others to run ``name`` on ``payload`` too (a no-op otherwise)."""
        if self.ranks is not None and self.ranks.leader:
            self.ranks.command(name, payload)

    def follow(self, name: str, payload: Any) -> None:
        """A follower: run what rank 0 announced (``_lead``), with this rank's own clock and a silent console."""
        from tether.train.progress import Stopwatch

        if name == "learn":
            try:
                self.learn(payload, Stopwatch(), _NoLog())
            except TrainingStopped:  # rank 0 stops the same way, on the same step, and then says stop
                pass
        elif name == "full_state":
            self.full_state(payload)
        elif name == "policy_logprobs":
            self.policy_logprobs(payload)
        elif name == "restore":
            self.restore(payload)
        else:
            raise ValueError(f"trainer rank {self.ranks.rank}: unknown command {name!r}")

    def full_state(self, optimizer: bool = False) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
        """The trainer's unsharded model state (and optimiser state when asked), single-process format: what
        the engine, the weight transport and the checkpoint take. Sharded: gathered to rank 0 (empty elsewhere)."""
        self._lead("full_state", optimizer)
        if self.ranks is None:
            return self.model.state_dict(), self.optimizer.state_dict() if optimizer else None
        with self._collective("gathering the weights"):
            return self.ranks.full_state(self.model, self.optimizer if optimizer else None)

    def policy_logprobs(self, rollout: Rollout) -> Tensor:
        """log pi_theta of ``rollout``'s tokens under the trainer's current weights, without gradients."""
        self._lead("policy_logprobs", rollout)
        with self._collective("scoring the probe batch"), torch.no_grad():
            return self.logprobs(self.model, rollout)[0]

    def _collective(self, what: str):
        """Sharded: a failed collective becomes ``TrainerRankFailed`` naming the rank (tether/dist/ranks.py)."""
        if self.ranks is None or self.follower:
            return nullcontext()
        return self.ranks.guard(what, self.checkpoint_note())

    def progress(self, description: str = "RL") -> StepProgress:
        return self.reporter.phase(description, self.cfg.steps, start=self.state.step)

    def finish(self) -> dict[str, Any]:
        """Evaluate the final weights, flush the trackers, write summary.json and the plots."""
        self.engine.load_weights(self.full_state()[0], version=self.state.step)
        accuracy_after = self.evaluate("after training")
        self.log.eval_point(self.state.step, accuracy_after)
        self.log.close()  # flush TensorBoard / W&B / MLflow
        self.given.notify("on_run_end", self.policy)
        counters = {**self.state.counters, "bad_rows_skipped": getattr(self.task, "n_skipped", 0)}
        n_eval = self.cfg.eval_size if self.episodes is not None else min(self.cfg.eval_size,
                                                                          len(self.task.eval_examples()))
        return write_summary(self.run_dir, to_dict(self.cfg), counters, self.state.accuracy_before, accuracy_after,
                             self.tokens_total, time.perf_counter() - self.t_start, extra={"eval/n": n_eval})

    def evaluate(self, when: str) -> float:
        """Greedy accuracy on the held-out split, or an environment's greedy success rate on its eval seeds;
        ``when`` names the evaluation in the progress line that reports it."""
        t0 = time.perf_counter()
        if self.episodes is not None:
            value, what = self.episodes.evaluate(), f"success rate on {self.cfg.eval_size} held-out episodes"
        else:
            value = setup.evaluate(self.policy, self.rewards, self.cfg)
            n = min(self.cfg.eval_size, len(self.task.eval_examples()))
            what = f"accuracy on {n} held-out problems"
        self.reporter.note(f"eval {when}: {what} {value:.1%} ({time.perf_counter() - t0:.1f} s)")
        self.given.notify("on_evaluate", when, value)
        return value

    # -- the stages a driver schedules ---------------------------------------------------------------
    def sample(self, step: int, salt: int = 0, n: int | None = None) -> list[Example]:
        """The step's prompts (``n``: the first n of them), seeded by (seed, step, salt)."""
        return setup.sample_examples(self.task, self.cfg, step_seed(self.cfg.seed, step, salt))[:n]

    def prompts(self, examples: list[Example]) -> tuple[list[list[int]], Tensor]:
        """Token ids of ``group_size`` copies of every prompt (chat template where configured) and their groups."""
        return setup.encode_prompts(self.policy, examples, self.cfg)

    def generate(self, examples: list[Example], seed: int) -> Rollout:
        """``group_size`` completions of every example in one engine call (the engine's current weights)."""
        return setup.generate(self.policy, examples, self.cfg, seed=seed)

    def collect(self, examples: list[Example], *, seed_fn, before_chunk=None, chunk_tokens: int | None = None
                ) -> Batch:
        """Generate and score one batch (its ``step`` is filled by the caller): ``group_size`` completions per
        example, or with ``env`` set ``group_size`` episodes per sampled seed. Chunk ``c`` (turn ``k``'s chunk
        ``c`` for episodes: ``seed_fn(1000 * k + c)``) is sampled with that seed after ``before_chunk`` (the
        async driver loads newer weights there; episodes number their chunks across turns, so the versions
        along an episode never decrease); without either it is one plain engine call per turn."""
        t0 = time.perf_counter()
        if self.episodes is not None:
            calls = itertools.count()  # chunks numbered across turns: a later turn never gets older weights
            hook = None if before_chunk is None else (lambda c: before_chunk(next(calls)))
            step = self.state.step
            ep = self.episodes.collect(examples, self.sampling, seed_fn=lambda k, c: seed_fn(1000 * k + c),
                                       before_chunk=hook, chunk_tokens=chunk_tokens, step=step)
            self.state.counters["env_failed"] = self.state.counters.get("env_failed", 0) + ep.failed
            # the agent algorithm's training rows: the episodes (rl), after BEPA's injection, or DAgger's labels
            ep, rows, rewards_B, algo_metrics = self.episodes.train_batch(ep, examples, step)
            return Batch(-1, rows, rewards_B, ep.failed, examples=examples, episodes=ep,
                         metrics={"time/rollout_s": time.perf_counter() - t0, "time/score_s": 0.0, **algo_metrics})
        if before_chunk is None and chunk_tokens is None:
            rollout = self.generate(examples, seed=seed_fn(0))
        else:
            prompts, group_B = self.prompts(examples)
            rollout = generate_partial(self.engine, prompts, self.sampling, group_B=group_B, chunk_tokens=chunk_tokens,
                                       seed_fn=seed_fn, before_chunk=before_chunk)
        t1 = time.perf_counter()
        rewards_B, failed, by_reward, reward_metrics = self.score(rollout, examples)
        return Batch(-1, rollout, rewards_B, failed, examples=examples, failed_by_reward=by_reward,
                     metrics={"time/rollout_s": t1 - t0, "time/score_s": time.perf_counter() - t1, **reward_metrics})

    def score(self, rollout: Rollout, examples: list[Example]) -> tuple[Tensor, int, dict[str, int], dict[str, float]]:
        """Every reward on the rollout's completions: the weighted sums, the failed calls (in all and per reward)
        and the per-reward metrics (``setup.reward_metrics``)."""
        scored = setup.score_rollout(self.rewards, self.policy, rollout, examples, self.cfg, self.state.step)
        rewards_B = torch.tensor([r.reward for r in scored.results], dtype=torch.float32)
        return (rewards_B, scored.failed_calls, setup.failed_by_reward(self.rewards, scored),
                setup.reward_metrics(self.rewards, scored))

    def logprobs(self, model: torch.nn.Module, rollout: Rollout) -> tuple[Tensor, Tensor]:
        return setup.token_logprobs(model, rollout, self.cfg)

    def learn(self, batch: Batch, clock: Stopwatch, console: Any) -> dict[str, Any]:
        """Train on one step's scored rollouts (the stages in the module docstring); the model then holds
        version ``batch.step + 1``. Returns the step's metrics (logged by :meth:`record`)."""
        if self.rewards is not None:  # counted; stops if all fail K steps (an environment's failures: env_failed)
            self.rewards.record(batch.failed, batch.scored or batch.rollout.batch_size, batch.step,
                                batch.failed_by_reward)
        self._lead("learn", batch)  # sharded: every rank computes this step from here, on the same batch
        with self._collective(f"training step {batch.step}"):
            return self._learn(batch, clock, console)

    def _learn(self, batch: Batch, clock: Stopwatch, console: Any) -> dict[str, Any]:
        cfg, model, s = self.cfg, self.model, batch.step
        assert s == self.state.step, f"run: got the batch of step {s} at step {self.state.step}"
        rollout, rewards_B = batch.rollout, batch.rewards_B
        counters = self.state.counters
        raw_reward_mean = rewards_B.mean()
        step_m: dict[str, Any] = {}
        if self.class_reward is not None:  # FAKER-Air's class-wise reward replaces the task's (its mean stays logged)
            texts = [self.policy.tokenizer.decode(x) for x in setup.completion_ids(self.policy, rollout)]
            rewards_B, step_m = self.class_reward(texts, [batch.examples[i // cfg.group_size].answer
                                                          for i in range(rollout.batch_size)])
        # expert presets: each group's expert solution as one more row, scored like a completion (sync only)
        rollout, rewards_B, expert_B, expert_failed = self.experts.append(rollout, rewards_B, batch.examples)
        counters["reward_failed"] += expert_failed
        mask_BT = rollout.loss_mask_BT
        if self.alp is not None:  # this step's noise seeds (the same on a resume)
            self.alp.begin_step(s)
        keep_B = batch.keep_B if batch.keep_B is not None else torch.ones(rollout.batch_size, dtype=torch.bool,
                                                                          device=mask_BT.device)
        if cfg.overlong_buffer is not None:
            rewards_B = rewards_B + soft_overlong_penalty(
                rollout.completion_len_B, cfg.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty)
        # pi_{theta_s} (skipped by loglinear, which needs no extra forward) and the old-logit anchor. With one
        # mini-batch and no micro-batching the update's first forward is at these same weights over these same
        # rows: run it once, with gradients, and hand its graph to the update (pi_old is its detached value).
        loglinear = self.old_logits.strategy is OldLogits.LOGLINEAR
        need_current = not loglinear or cfg.kl_placement is KLPlacement.REWARD
        one_forward = (self.ranks is None and not loglinear and cfg.minibatches == 1
                       and (cfg.micro_batch_size or rollout.batch_size) >= rollout.batch_size)
        with clock("recompute"):
            t0 = time.perf_counter()
            with torch.set_grad_enabled(one_forward):
                theta_BT, entropy_BT = self.logprobs(model, rollout) if need_current else (None, None)
            current_BT = None if theta_BT is None else theta_BT.detach()
            episodes_BT = current_BT  # the episodes' log-probs for their meter (DAgger trains on other rows)
            if batch.episodes is not None and batch.episodes.rollout is not rollout:
                with torch.no_grad():
                    episodes_BT = self.logprobs(model, self.episodes.meter_rows(batch.episodes.rollout))[0]
            entropy_BT = None if entropy_BT is None else entropy_BT.detach()
            current_s = time.perf_counter() - t0
            anchor_BT, behave_BT, old_s = self.old_logits.anchor(rollout, current_BT)
            if self.old_logits.strategy is OldLogits.RECOMPUTE:  # its anchor is that forward
                old_s += current_s
            with torch.no_grad():
                logp_ref_BT = self.logprobs(self.ref_model, rollout)[0] if self.ref_model is not None else None
        rollout, expert_inputs = self.experts.loss_inputs(rollout, current_BT, expert_B)  # expert_B, baseline
        kl_coef = None  # the config's, unless PI-controlled (kl_target): updated from this step's KL, then used
        if self.kl_control is not None:
            kl_coef, kl_m = self.kl_control.coef(measured_kl(current_BT, logp_ref_BT, mask_BT))
            step_m.update(kl_m)
        if cfg.kl_placement is KLPlacement.REWARD:
            rewards_B = rewards_B + setup.kl_reward(current_BT, logp_ref_BT, mask_BT, cfg, kl_coef)
        if cfg.dynamic_sampling:  # DAPO: groups whose rewards are all equal carry no signal
            info_B = informative_groups(rewards_B, rollout.group_B)
            counters["dropped_groups"] += int(torch.unique(rollout.group_B[keep_B & ~info_B]).numel())
            keep_B = keep_B & info_B
        old_for_loss = anchor_BT if anchor_BT is not None else rollout.logp_mu_BT
        include_B = None if expert_B is None else ~expert_B  # group statistics over sampled rows only
        if batch.episodes is not None and batch.episodes.rollout is rollout:  # turn-level credit (tether.agent.loop)
            advantages_B, advantages_BT = self.episodes.advantages(batch.episodes, rewards_B, self.advantage_fn,
                                                                   include_B)
            advantages_BT = advantages_BT.to(old_for_loss.dtype)
        else:
            advantages_B = self.advantage_fn(rewards_B, rollout.group_B, include_B)
            advantages_BT = advantages_B[:, None].to(old_for_loss.dtype) * mask_BT
        if batch.weight_BT is not None:
            advantages_BT = advantages_BT * batch.weight_BT
        with clock("meter"):
            old_m, rollout_m, entropy_m = on_policy_rows(expert_B, current_BT, rollout, entropy_BT)  # sampled rows
            metrics: dict[str, Any] = setup.mismatch_metrics(old_m, rollout_m, entropy_m, s, behave_BT=behave_BT)
            metrics.update(batch.metrics)  # the driver's (e.g. dist's post-sync probe) is checked by the budget too
            try:
                step_args = self.control.apply(metrics, self.optimizer, self.scheduler, step=s, console=console,
                                               where=self.checkpoint_note())
            except TrainingStopped:  # the stopping step's measurements are kept, not dropped
                self.log.write({**metrics, "step": s, "budget/stopped": 1})
                raise
        finite = bool(torch.isfinite(torch.where(mask_BT, old_for_loss, 0)).all()
                      and torch.isfinite(rollout.logp_mu_BT).all())
        trained = rollout  # DART's high-entropy step selection may take agent steps out of the loss mask
        if batch.episodes is not None:
            trained, dart_metrics = self.episodes.select_steps(rollout, entropy_BT)
            if trained is not rollout:  # the dropped steps' advantages go with them (the switch off: nothing to do)
                advantages_BT = advantages_BT * trained.loss_mask_BT
            metrics.update(dart_metrics)
        if finite and keep_B.any():
            before = [t.clone() for t in self._trainable()] if cfg.max_update_ratio is not None else None
            with clock("update"):
                update = update_phase(
                    cfg, self.preset, step_args, model, self.optimizer, trained, keep_B, old_for_loss, logp_ref_BT,
                    advantages_BT, s, logprobs=self.logprobs,
                    kl_loss=(lambda lp, ref, m, mu: setup.kl_loss_terms(lp, ref, m, mu, cfg, kl_coef))
                    if cfg.kl_placement is KLPlacement.LOSS else None,
                    first_logp_theta_BT=theta_BT if one_forward else None,
                    prox_fn=self.old_logits.prox_fn(rollout, s), extra_inputs=expert_inputs, ranks=self.ranks)
            finite = update.pop("finite")
            metrics.update(update)
            if before is not None and finite:
                self._check_update_size(before, metrics, step=s)
        self._finish_update(metrics, finite, step=s, console=console)
        self.state.step += 1
        with clock("sync"):
            self.old_logits.publish(self.state.step)
        metrics.update({
            "reward/mean": raw_reward_mean, "reward/shaped_mean": rewards_B.mean(), "reward/failed": batch.failed,
            "length/mean": rollout.completion_len_B.float().mean(), "time/old_logits_s": old_s,
            **advantage_metrics(advantages_B, include_B),
            **step_m,
            "mem/old_logits_bytes": self.old_logits.extra_bytes(),
            "async/version_min": (int(rollout_m.version_BT[rollout_m.loss_mask_BT].min())
                                  if rollout_m.loss_mask_BT.any() else s),
            **self.experts.metrics,
            **(self.alp.metrics() if self.alp is not None else {}),
            **(self.episodes.metrics(batch.episodes, s, model, episodes_BT) if batch.episodes is not None else {}),
        })
        return metrics

    def checkpoint_note(self) -> str:
        """The sentence a stop message ends with: which checkpoint a resume starts from (all were written before
        any alarm: a run stops at its first exploding update, before that step's checkpoint)."""
        if self.follower:
            return "(rank 0 names the checkpoint)"
        if self.last_checkpoint is None:
            return f"No checkpoint was written yet in {self.run_dir / 'checkpoints'}."
        return (f"The last checkpoint, step {self.last_checkpoint} in {self.run_dir / 'checkpoints'}, was written "
                "before it and is intact.")

    def _check_update_size(self, before: list[Tensor], metrics: dict[str, Any], *, step: int) -> None:
        """``update/relative_norm = ||theta' - theta|| / ||theta||`` over the trainable weights; above
        ``max_update_ratio`` the update exploded (a finite step can still destroy the weights): alarm, log the
        step's row and stop, so no checkpoint of the destroyed weights is written."""
        after = self._trainable()
        moved = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(a - b) for a, b in zip(after, before)]))
        size = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(b) for b in before]))
        if self.ranks is not None:  # each rank holds a shard: ||.||^2 summed over the ranks
            moved, size = (torch.tensor(v, dtype=torch.float64).sqrt()
                           for v in self.ranks.all_sum([float(moved) ** 2, float(size) ** 2]))
        ratio = float(moved / size.clamp(min=torch.finfo(size.dtype).tiny))
        metrics["update/relative_norm"] = ratio
        if ratio > self.cfg.max_update_ratio or not math.isfinite(ratio):
            metrics["alarm/exploding_update"] = 1
            self.log.write({**metrics, "step": step})
            raise TrainingStopped(
                f"step {step}: the update moved the weights by {ratio:.3g} of their norm (max_update_ratio "
                f"{self.cfg.max_update_ratio:g}): an exploding update (is the learning rate too high?); stopping. "
                + self.checkpoint_note())

    def _trainable(self) -> list[Tensor]:
        """The trainable weights (sharded ranks: this rank's shards of them), detached."""
        if self.ranks is not None:
            return self.ranks.local_shards(self.model)
        return [p.detach() for p in self.model.parameters() if p.requires_grad]

    def _finish_update(self, metrics: dict[str, Any], finite: bool, *, step: int, console: Any) -> None:
        """Advance the LR schedule, or count a non-finite step (skipped, alarmed) and stop once
        ``cfg.max_bad_steps`` of them come in a row (the last checkpoint stays intact)."""
        if finite:
            self.scheduler.step()
            self.state.bad_steps = 0
            return
        self.state.bad_steps += 1
        self.state.counters["skipped_steps"] += 1
        metrics["alarm/non_finite"] = 1
        console.print(f"[red]step {step}: non-finite loss or log-probs; update skipped[/red]")
        if self.state.bad_steps >= self.cfg.max_bad_steps:
            raise TrainingStopped(
                f"{self.state.bad_steps} consecutive non-finite steps (last: step {step}); stopping. "
                + self.checkpoint_note())

    def record(self, metrics: dict[str, Any], batch: Batch, clock: Stopwatch, progress: StepProgress) -> None:
        """Log one step's row (metrics.jsonl and trackers) and advance the progress bar."""
        n_tokens = int(batch.rollout.loss_mask_BT.sum())  # sampled tokens (an episode's replies are not)
        self.tokens_total += n_tokens
        dt = clock.total()
        metrics.update({**clock.metrics(), **batch.metrics, "step": batch.step, "time/step_s": dt,
                        "perf/tokens_per_s": n_tokens / dt, "lr": self.scheduler.get_last_lr()[0]})
        every = self.cfg.eval_every
        if every is not None and self.state.step % every == 0 and self.state.step < self.cfg.steps:
            # the sync driver has loaded the updated weights into the engine (the final step's eval is finish's)
            metrics["eval/accuracy"] = self.evaluate(f"at step {self.state.step}")
            self.log.eval_point(self.state.step, metrics["eval/accuracy"])
        self.log.write(metrics)
        progress.advance(metrics)
        self.given.notify("on_step_end", metrics)

    def checkpoint_if_due(self, extra: dict[str, Any] | None = None) -> None:
        """Write a checkpoint every ``checkpoint_every`` steps, at the end and when a stop signal came during the
        step (``extra``: the driver's own state); then stop cleanly if one came (``signals.Interrupted``)."""
        step = self.state.step
        if step % self.cfg.checkpoint_every == 0 or step == self.cfg.steps or self.interrupt.requested():
            self._save(step, extra)
        self.interrupt.check(step)

    def _save(self, step: int, extra: dict[str, Any] | None) -> None:
        model_sd, optimizer_sd = self.full_state(optimizer=True)  # sharded: gathered, loads into any rank count
        path = self.dir.save_checkpoint(step, {
            "model": model_sd, "optimizer": optimizer_sd,
            "scheduler": self.scheduler.state_dict(), "run_state": self.state.__dict__,
            "old_logits": self.old_logits.state_dict(),
            **({"ref_model": self.ref_model.state_dict()} if self.ref_model is not None else {}),
            **({"alp": self.alp.state_dict()} if self.alp is not None else {}),
            **({"agent": self.episodes.state_dict()} if self.episodes is not None else {}),
            **(extra or {}),
        })
        self.last_checkpoint = step
        self.given.notify("on_save", step, path)


class _NoLog:
    """A follower's metrics log and console: rank 0 writes and prints."""

    def write(self, row: dict[str, Any]) -> None:
        pass

    def print(self, *args: Any, **kwargs: Any) -> None:
        pass

    def eval_point(self, step: int, value: float) -> None:
        pass

    def close(self) -> None:
        pass
