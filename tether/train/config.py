"""The typed config of ``tether train``: ``TrainConfig`` with nested sections for one mode or feature.

Every field has a default and a one-line help; the CLI flags are generated from it (``tether train --help``,
grouped by section) and ``--config FILE`` reads TOML/YAML, both flat (``--max-staleness 2``,
``budget_max_kl = 0.02``). Sections: ``async_`` (``AsyncConfig``, only with ``mode = async``), ``kl``
(``KLConfig``, only with a ``kl_placement``), ``agent`` (``AgentConfig``, only with ``env``), ``budget`` (``BudgetConfig``, the mismatch budget). In Python,
``TrainConfig.from_flat(kl_placement="reward", kl_coef=0.1)`` takes the flat names exactly as the CLI does;
``TrainConfig(kl_placement="reward", kl=KLConfig(coef=0.1))`` is the same config. Strings are converted to the
enums and every number is range-checked before anything is built, with errors naming the field."""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tether.configs import build, coerce, coerce_fields, opt, section
from tether.dist.transport import WeightTransport
from tether.engine.kinds import EngineKind, RolloutPrecision  # the engine's enums, still importable from here
from tether.meter.budget import BudgetAction, MeterRatio
from tether.objectives.advantages import ADVANTAGES, STATEFUL_ADVANTAGES


class KLPlacement(str, enum.Enum):
    NONE = "none"
    REWARD = "reward"
    LOSS = "loss"


class LRSchedule(str, enum.Enum):
    CONSTANT = "constant"
    COSINE = "cosine"


class TrainMode(str, enum.Enum):
    SYNC = "sync"
    ASYNC = "async"
    DIST = "dist"


class StalenessPolicy(str, enum.Enum):
    WAIT = "wait"
    DROP = "drop"
    DOWNWEIGHT = "downweight"


class OldLogits(str, enum.Enum):
    RECOMPUTE = "recompute"
    SNAPSHOT = "snapshot"
    EWMA = "ewma"
    LOGLINEAR = "loglinear"


def _check(ok: bool, name: str, message: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"config field '{name}' {message}, got {value}")


@dataclass
class AsyncConfig:
    """Settings of the async loop (docs/async.md); exists only with ``mode = async``."""
    max_staleness: int = opt(1, "bound k on token age (trainer version - generating version)")
    staleness_policy: StalenessPolicy = opt(StalenessPolicy.WAIT, "tokens older than k: wait, drop (refilled with "
                                            "fresh groups), downweight")
    rollout_lag: int | None = opt(None, "the engine runs this many versions ahead of the trainer: batch s starts on "
                                        "version s - lag (none: max_staleness)")
    freshest_weights: bool = opt(False, "start batches and chunks on the newest published weights instead of exactly "
                                        "version s - lag (real-time, not reproducible)")
    partial_chunk_tokens: int | None = opt(None, "generate in chunks of this many tokens, picking up new weights "
                                                 "between chunks (partial rollouts); none: whole completions")
    downweight_decay: float = opt(0.5, "staleness_policy downweight: a token of age a > k gets weight decay^(a - k)")
    old_logits: OldLogits = opt(OldLogits.RECOMPUTE, "how pi_old is obtained: recompute, snapshot, ewma, loglinear")
    ewma_beta: float = opt(0.9, "old_logits ewma: EWMA decay of the proximal weights (PPO-EWMA beta)")

    def __post_init__(self) -> None:
        coerce_fields(self)
        _check(self.max_staleness >= 0, "max_staleness", "must be >= 0", self.max_staleness)
        _check(self.rollout_lag is None or self.rollout_lag >= 0, "rollout_lag", "must be >= 0 or none", self.rollout_lag)
        _check(self.partial_chunk_tokens is None or self.partial_chunk_tokens >= 1, "partial_chunk_tokens",
               "must be >= 1 or none", self.partial_chunk_tokens)
        _check(0 < self.downweight_decay <= 1, "downweight_decay", "must be in (0, 1]", self.downweight_decay)
        _check(0 <= self.ewma_beta <= 1, "ewma_beta", "must be in [0, 1]", self.ewma_beta)
        if self.staleness_policy is StalenessPolicy.WAIT and self.lag > self.max_staleness:
            raise ValueError("config field 'rollout_lag' exceeds 'max_staleness' under staleness_policy 'wait' "
                             "(wait never admits a batch older than max_staleness)")

    @property
    def lag(self) -> int:
        """Versions the engine runs ahead of the trainer (derived: rollout_lag, else max_staleness)."""
        return self.max_staleness if self.rollout_lag is None else self.rollout_lag


@dataclass
class DistConfig:
    """Settings of the distributed driver (docs/distributed.md); exists only with ``mode = dist``."""
    rollout_workers: int = opt(2, "rollout workers (Ray actors, one engine each); 0: one worker in the trainer's "
                                  "process, no Ray")
    ray_address: str | None = opt(None, "an existing Ray cluster to join (ray start --head prints it); none: a local "
                                        "cluster started and stopped by tether")
    sync_dir: str | None = opt(None, "directory of the filesystem weight transport (shared storage across nodes); "
                                     "none: RUN/weights")
    sync_timeout_s: float = opt(120.0, "a weight sync or a worker's batch that takes longer fails naming the worker")
    weight_transport: WeightTransport = opt(WeightTransport.FS, "how weights reach the workers: fs (safetensors "
                                            "file per version in sync_dir) or broadcast (torch.distributed from the "
                                            "trainer: gloo on CPU, nccl on CUDA; needs rollout_workers >= 1)")
    probe_prompts: int = opt(2, "prompts of the post-sync probe batch every worker scores after each sync")
    probe_max_logp_diff: float = opt(1e-4, "alarm when a worker's probe log-probs differ from the trainer's by more")
    max_worker_restarts: int = opt(3, "restarts of dead rollout workers allowed in a run before it stops")
    trainer_ranks: int = opt(1, "trainer processes (torch.distributed, FSDP2-sharded model, data-parallel over each "
                                "step's rows with global loss normalisers); 1: the trainer is this process alone")

    def __post_init__(self) -> None:
        coerce_fields(self)
        _check(self.rollout_workers >= 0, "rollout_workers", "must be >= 0", self.rollout_workers)
        _check(self.sync_timeout_s > 0, "sync_timeout_s", "must be > 0", self.sync_timeout_s)
        _check(self.probe_prompts >= 1, "probe_prompts", "must be >= 1", self.probe_prompts)
        _check(self.probe_max_logp_diff >= 0, "probe_max_logp_diff", "must be >= 0", self.probe_max_logp_diff)
        _check(self.max_worker_restarts >= 0, "max_worker_restarts", "must be >= 0", self.max_worker_restarts)
        _check(self.trainer_ranks >= 1, "trainer_ranks", "must be >= 1", self.trainer_ranks)
        _check(self.weight_transport is WeightTransport.FS or self.rollout_workers >= 1, "weight_transport",
               "broadcast needs rollout_workers >= 1 (a group of the trainer and its Ray workers; with 0 the worker "
               "shares the trainer's process: use fs)", self.weight_transport.value)


KL_ESTIMATORS = ("k1", "k2", "k3", "k3plus", "k3_is")


@dataclass
class KLConfig:
    """The KL penalty to the reference (initial) policy; exists only with ``kl_placement`` reward or loss."""
    FLAT_PREFIX = "kl_"
    coef: float = opt(0.0, "coefficient of the KL to the reference (initial) policy (> 0)")
    estimator: str = opt("k3", "KL estimator: k1, k2, k3, k3plus, k3_is ((pi_theta/mu) k3, unbiased from the "
                               "engine's samples; kl_placement loss only)")

    target: float | None = opt(None, "PI-control kl_coef toward this KL (token-mean k3 of pi_old to the reference, "
                                     "EMA-smoothed; FAKER-Air): kl_coef is the initial value (none: fixed)")
    coef_min: float = opt(5e-6, "the PI-controlled kl_coef's lower bound (with kl_target)")
    coef_max: float = opt(0.1, "the PI-controlled kl_coef's upper bound (with kl_target)")
    kp: float = opt(0.08, "the KL controller's proportional gain (with kl_target)")
    ki: float = opt(0.02, "the KL controller's integral gain (with kl_target; the integral decays by 0.95 a step)")
    ema_alpha: float = opt(0.05, "EMA smoothing of the measured KL the controller reads (with kl_target)")

    def __post_init__(self) -> None:
        coerce_fields(self)
        _check(self.coef > 0, "kl_coef", "must be > 0 when kl_placement is not 'none'", self.coef)
        _check(self.target is None or self.target > 0, "kl_target", "must be > 0 or none", self.target)
        _check(0 < self.coef_min <= self.coef_max, "kl_coef_min", "must be > 0 and <= kl_coef_max", self.coef_min)
        _check(self.target is None or self.coef_min <= self.coef <= self.coef_max, "kl_coef",
               "must lie in [kl_coef_min, kl_coef_max] with kl_target", self.coef)
        _check(self.kp >= 0 and self.ki >= 0, "kl_kp", "kl_kp and kl_ki must be >= 0", (self.kp, self.ki))
        _check(0 < self.ema_alpha <= 1, "kl_ema_alpha", "must be in (0, 1]", self.ema_alpha)
        _check(self.estimator in KL_ESTIMATORS, "kl_estimator", f"must be one of {', '.join(KL_ESTIMATORS)}",
               repr(self.estimator))


@dataclass
class BudgetConfig:
    """The mismatch budget (docs/meter.md): thresholds on the meter and what to do when one is crossed."""
    FLAT_PREFIX = "budget_"
    ratio: MeterRatio = opt(MeterRatio.TOTAL, "the ratio the thresholds read: total (pi_old/mu) or engine (fresh tokens)")
    min_ess_token: float | None = opt(None, "alarm when meter/<ratio>/ess_token < this (none: off)")
    min_ess_seq: float | None = opt(None, "alarm when meter/<ratio>/ess_seq < this (none: off)")
    max_abs_logr_p99: float | None = opt(None, "alarm when meter/<ratio>/abs_logr_p99 > this (none: off)")
    max_kl: float | None = opt(None, "alarm when meter/<ratio>/kl_k3 > this (none: off)")
    action: BudgetAction = opt(BudgetAction.WARN, "on an alarm: warn, tighten (the correction), lower_lr, stop")
    lr_factor: float = opt(0.5, "lower_lr multiplies the learning rate by this on every step with an alarm")
    tighten_factor: float = opt(0.5, "tighten moves caps, bands and clip ranges this factor closer to 1 per alarm step")

    def __post_init__(self) -> None:
        coerce_fields(self)
        from tether.train.mismatch_control import validate_config

        validate_config(self)


def _async_on(values: dict) -> bool:
    return values.get("mode") is TrainMode.ASYNC


def _dist_on(values: dict) -> bool:
    return values.get("mode") is TrainMode.DIST


def _agent_on(values: dict) -> bool:
    return values.get("env") is not None


CREDITS = ("episode", "turn", "turn_unbiased", "gigpo", "discounted")
"""Turn-level credit estimators of multi-turn episodes (``tether.agent.credit``)."""
def _is_model_dir(path: str) -> bool:
    from pathlib import Path

    return (Path(path) / "config.json").is_file()


AGENT_ALGORITHMS = ("rl", "dagger", "bepa")
"""What a run with ``env`` trains (``AgentConfig.algorithm``; docs/agents.md)."""
CREDIT_BASELINES = ("std", "mean", "loo")
"""How a turn-level credit estimator centres a value against its cell (``tether.agent.credit.BASELINES``)."""


@dataclass
class AgentConfig:
    """Multi-turn episodes in an environment (docs/agents.md); exists only with ``env`` set."""
    env_options: dict | None = opt(None, 'JSON dict of keyword arguments for the environment, e.g. {"size": 32}')
    max_turns: int = opt(8, "actions per episode at most (an environment's own max_turns can lower it)")
    max_episode_tokens: int | None = opt(None, "token budget of one episode: prompt + actions + replies (none: the "
                                               "model's context length); an episode that would pass it ends "
                                               "with outcome 'budget'")
    credit: str = opt("episode", "turn-level credit: episode (the preset's advantage of the episode return on every "
                                 "turn), turn (per-turn-index GRPO), turn_unbiased, gigpo, discounted")
    credit_baseline: str | None = opt(None, "how turn-level credit centres each value against its cell: std (GRPO), "
                                            "mean (Dr. GRPO), loo (leave-one-episode-out); none: the estimator's "
                                            "default (mean for turn_unbiased, else std). Episode credit: use "
                                            "--advantage")
    gamma: float = opt(1.0, "discount of step returns (turn, turn_unbiased, gigpo, discounted credit)")
    gigpo_omega: float = opt(1.0, "gigpo credit: weight of the step-level (anchor-state) advantage")
    drift_every: int = opt(1, "measure tokenisation drift every N steps (re-render the chat and compare; 0: never)")
    fission: int | None = opt(None, "Fission-GRPO: fork one failed episode per group at its failing step and sample "
                                    "this many (G' >= 2) continuations from that state as a new group (none: off)")
    algorithm: str = opt("rl", "agent algorithm: rl (the objective preset on the episodes), dagger (teacher/student "
                               "mixture, teacher labels, SFT on the aggregate; tether.agent.dagger), bepa (GRPO with "
                               "a per-task cache injected into all-fail groups; tether.agent.bepa)")
    dagger_beta: float = opt(1.0, "dagger: beta_0, the probability that the teacher acts at a turn of step 0")
    dagger_beta_decay: float = opt(0.5, "dagger: p in beta_i = beta_0 * p^i (1: constant beta)")
    dagger_rows: int = opt(64, "dagger: aggregated (state, teacher action) rows trained on per step (a uniform "
                               "sample of the aggregate)")
    dagger_teacher: str = opt("scripted", "dagger: the teacher: scripted (the environment's solver, expert_action()), "
                                          "builtin (the built-in tiny model warm-started dagger_teacher_steps steps on "
                                          "the expert episodes) or a Hugging Face model directory sharing the "
                                          "student's tokenizer; a model teacher acts greedily")
    dagger_teacher_steps: int = opt(400, "dagger_teacher builtin: its SFT warm-start steps on the expert episodes "
                                         "(cached on disk)")
    bepa_cache_size: int = opt(1024, "bepa: tasks the trajectory cache holds at most (the oldest entry goes first)")
    task_pool: int | None = opt(None, "draw training episode seeds from the N seeds 0..N-1, so tasks repeat (none: "
                                      "a fresh seed from 10^9 each time)")
    dart_entropy_top: float | None = opt(None, "DART: train only on this fraction (0, 1] of the batch's agent steps "
                                               "(turns), those of highest mean token entropy; the rest leave the loss "
                                               "mask (none: off; tether.agent.dart)")
    dart_adaptive: bool = opt(False, "DART: share each step's episodes among its tasks by recent success rate p, "
                                     "weight p(1-p), within dart_min_rollouts..dart_max_rollouts (total fixed)")
    dart_min_rollouts: int = opt(2, "dart_adaptive: episodes per task at least")
    dart_max_rollouts: int | None = opt(None, "dart_adaptive: episodes per task at most (none: 2 * group_size)")
    dart_window: int = opt(8, "dart_adaptive: a task's success rate is over its last N episodes")
    dart_reuse: bool = opt(False, "DART experience reuse: keep each task's latest successful episode and replay it "
                                  "into groups where every sampled episode failed (BEPA's cache, own successes only)")

    def __post_init__(self) -> None:
        coerce_fields(self)
        _check(self.algorithm in AGENT_ALGORITHMS, "algorithm", f"must be one of {', '.join(AGENT_ALGORITHMS)}",
               repr(self.algorithm))
        _check(0 <= self.dagger_beta <= 1, "dagger_beta", "must be in [0, 1]", self.dagger_beta)
        _check(0 <= self.dagger_beta_decay <= 1, "dagger_beta_decay", "must be in [0, 1]", self.dagger_beta_decay)
        _check(self.dagger_rows >= 1, "dagger_rows", "must be >= 1", self.dagger_rows)
        _check(self.dagger_teacher_steps >= 0, "dagger_teacher_steps", "must be >= 0", self.dagger_teacher_steps)
        _check(self.dagger_teacher in ("scripted", "builtin") or _is_model_dir(self.dagger_teacher), "dagger_teacher",
               "must be scripted, builtin or a model directory with a config.json", repr(self.dagger_teacher))
        _check(self.bepa_cache_size >= 1, "bepa_cache_size", "must be >= 1", self.bepa_cache_size)
        _check(self.task_pool is None or 1 <= self.task_pool <= 1_000_000_000, "task_pool",
               "must be in [1, 10^9] or none", self.task_pool)
        _check(self.dart_entropy_top is None or 0 < self.dart_entropy_top <= 1, "dart_entropy_top",
               "must be in (0, 1] or none", self.dart_entropy_top)
        _check(self.dart_entropy_top is None or self.algorithm != "dagger", "dart_entropy_top",
               "selects among sampled agent steps; algorithm 'dagger' trains on teacher labels", self.dart_entropy_top)
        _check(self.dart_min_rollouts >= 1, "dart_min_rollouts", "must be >= 1", self.dart_min_rollouts)
        _check(self.dart_max_rollouts is None or self.dart_max_rollouts >= self.dart_min_rollouts, "dart_max_rollouts",
               "must be >= dart_min_rollouts or none", self.dart_max_rollouts)
        _check(self.dart_window >= 1, "dart_window", "must be >= 1", self.dart_window)
        _check(not self.dart_reuse or self.algorithm == "rl", "dart_reuse",
               f"is algorithm 'rl''s switch (algorithm {self.algorithm!r} has its own rows: bepa already injects its "
               "cache)", self.dart_reuse)
        _check(not self.dart_reuse or self.fission is None, "dart_reuse",
               "excludes fission (a fork's replayed prefix would mix with the replayed episodes)", self.dart_reuse)
        _check(self.max_turns >= 1, "max_turns", "must be >= 1", self.max_turns)
        _check(self.max_episode_tokens is None or self.max_episode_tokens >= 2, "max_episode_tokens",
               "must be >= 2 or none", self.max_episode_tokens)
        _check(self.credit in CREDITS, "credit", f"must be one of {', '.join(CREDITS)}", repr(self.credit))
        _check(self.credit_baseline is None or self.credit_baseline in CREDIT_BASELINES, "credit_baseline",
               f"must be one of {', '.join(CREDIT_BASELINES)} or none", repr(self.credit_baseline))
        _check(self.credit_baseline is None or self.credit != "episode", "credit_baseline",
               "applies to turn-level credit (turn, turn_unbiased, gigpo, discounted); with credit 'episode' the "
               "preset's advantage estimator centres the returns (--advantage grpo / dr_grpo / rloo)",
               repr(self.credit_baseline))
        _check(0 < self.gamma <= 1, "gamma", "must be in (0, 1]", self.gamma)
        _check(self.gigpo_omega >= 0, "gigpo_omega", "must be >= 0", self.gigpo_omega)
        _check(self.drift_every >= 0, "drift_every", "must be >= 0", self.drift_every)
        _check(self.fission is None or self.fission >= 2, "fission",
               "must be >= 2 (a forked group needs two continuations to compare) or none", self.fission)
        _check(self.fission is None or self.algorithm == "rl", "fission",
               f"forks the sampled episodes of algorithm 'rl'; algorithm {self.algorithm!r} trains on teacher labels "
               "or cached episodes, which a fork's replayed prefix would mix with", self.fission)


@dataclass
class AlpConfig:
    """ALP's layerwise perturbation of the training forward (docs/objectives_notes/alp.md); exists only with
    ``alp``. Defaults: the official README (sigma_0 1e-6, its learning rate 5e-4, all layers)."""
    std: float = opt(1e-6, "initial noise scale sigma_0 of every perturbed layer (> 0)")
    lr: float = opt(5e-4, "learning rate of the per-layer log-scales log sigma_l (AdamW, no weight decay; the run's "
                          "LR schedule applies to it too)")
    learnable: bool = opt(True, "learn the per-layer log-scales (--no-alp-learnable: fixed at std)")
    start: int = opt(0, "first perturbed decoder layer")
    end: int | None = opt(None, "perturb layers [start, end) (none: to the last layer)")

    def __post_init__(self) -> None:
        coerce_fields(self)
        _check(math.isfinite(self.std) and self.std > 0, "alp_std", "must be finite and > 0", self.std)
        _check(math.isfinite(self.lr) and self.lr > 0, "alp_lr", "must be finite and > 0", self.lr)
        _check(self.start >= 0, "alp_start", "must be >= 0", self.start)
        _check(self.end is None or self.end > self.start, "alp_end", "must be > alp_start or none", self.end)


@dataclass
class ClasswiseConfig:
    """FAKER-Air's class-wise reward on graded numeric answers (docs/tasks.md, class-wise rewards); exists only
    with ``class_bounds`` (a top-level field: the section's switch). Defaults: FAKER-Air's (coarse 0.5, exact 0.5, no false-alarm penalty, recall floor 0.60,
    false-alarm target 0.18, multipliers from 0.2 in [0, 3], gains 0.05 / 0.01, metric EMA 0.05)."""
    FLAT_PREFIX = "class_"
    high_from: int = opt(2, "classes >= this are 'high' (an alarm): the coarse match, recall and false alarms read it")
    coarse: float = opt(0.5, "reward for predicting the gold's side (high or not)")
    exact: float = opt(0.5, "reward for predicting the gold's class exactly")
    fa_penalty: float = opt(0.0, "penalty for a false alarm (high predicted, gold not high)")
    constraints: bool = opt(True, "add the PI-controlled recall-floor and false-alarm-target terms to the reward")
    recall_floor: float = opt(0.6, "recall floor of the constraint term, in [0, 1]")
    far_target: float = opt(0.18, "false-alarm-ratio target of the constraint term, in [0, 1]")
    lambda_init: float = opt(0.2, "initial value of both constraint multipliers")
    lambda_max: float = opt(3.0, "upper bound of both constraint multipliers (lower bound 0)")
    kp: float = opt(0.05, "the constraint controllers' proportional gain")
    ki: float = opt(0.01, "the constraint controllers' integral gain (integral decay 0.95)")
    metric_alpha: float = opt(0.05, "EMA smoothing of the batch recall and false-alarm ratio the controllers read")

    def __post_init__(self) -> None:
        coerce_fields(self)
        for name in ("coarse", "exact", "fa_penalty", "kp", "ki"):
            _check(getattr(self, name) >= 0, f"class_{name}", "must be >= 0", getattr(self, name))
        for name in ("recall_floor", "far_target"):
            _check(0 <= getattr(self, name) <= 1, f"class_{name}", "must be in [0, 1]", getattr(self, name))
        _check(0 <= self.lambda_init <= self.lambda_max, "class_lambda_init", "must be in [0, class_lambda_max]",
               self.lambda_init)
        _check(0 < self.metric_alpha <= 1, "class_metric_alpha", "must be in (0, 1]", self.metric_alpha)

def _class_on(values: dict) -> bool:
    return values.get("class_bounds") not in (None, "")


def _alp_on(values: dict) -> bool:
    return values.get("alp") is True


def _kl_on(values: dict) -> bool:
    return values.get("kl_placement", KLPlacement.NONE) is not KLPlacement.NONE


TRL_ALIASES = {
    "learning_rate": "lr", "num_generations": "group_size", "max_completion_length": "max_new_tokens",
    "beta": "kl_coef", "num_iterations": "epochs", "max_grad_norm": "grad_clip", "lr_scheduler_type": "lr_schedule",
    "output_dir": "out", "max_steps": "steps", "save_steps": "checkpoint_every", "epsilon": "objective_args",
    "epsilon_high": "objective_args", "loss_type": "objective", "per_device_train_batch_size": "prompts_per_step",
    "gradient_accumulation_steps": "micro_batch_size", "report_to": "tensorboard / wandb / mlflow",
    "dataset": "task", "reward_funcs": "reward", "use_vllm": "engine", "resume_from_checkpoint": "resume",
    "num_train_epochs": "steps",
}
"""TRL ``GRPOConfig`` names a config file may use by habit, and tether's field for each (for "did you mean")."""


DEFAULT_JOB: dict[str, Any] = {"mode": "async", "max_staleness": 1, "old_logits": "snapshot",
                               "rollout_precision": "int8", "objective": "tis"}
"""The default job (issue 24, docs/default_job.md): what ``tether train`` adds to ``TrainConfig``'s field defaults,
which are the classic job (synchronous, fp32 engine, GRPO; ``tether train --classic``). The engine runs one
weight version ahead of the trainer with int8 weights while the trainer stays fp32, so every batch carries the two
commonest mismatch sources at once (staleness and engine numerics); ``pi_old`` comes from a snapshot of each
token's own version, so the meter splits the mismatch exactly into its engine and staleness parts; TIS truncates
the engine's importance weight ``pi_old(v)/mu`` at 2 and the PPO clip on ``pi_theta/pi_old(v)`` bounds the rest."""

DEFAULT_JOB_OFF = ("objective", "mode", "model", "engine", "env", "bf16", "eval_every", "vllm_sync_every",
                   "share_engine_weights")
"""Fields that, set to anything but their ``TrainConfig`` default (``objective`` and ``mode``: set at all), pick
a job of their own: the default job then adds nothing (``default_job``)."""


def default_job(given: Mapping[str, Any]) -> dict[str, Any]:
    """The default job's settings (``DEFAULT_JOB``) not already in ``given`` (the flat values of a command line
    and its config file); ``{}`` when ``given`` picks a job of its own (``DEFAULT_JOB_OFF``), so ``tether train
    --objective sapo`` or ``--mode sync`` run exactly the fields they name over the classic defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for name in DEFAULT_JOB_OFF:
        if name not in given:
            continue
        if name in ("objective", "mode") or coerce(TrainConfig, name, given[name]) != defaults[name]:
            return {}
    return {k: v for k, v in DEFAULT_JOB.items() if k not in given}


def algorithm_defaults(given: Mapping[str, Any]) -> dict[str, Any]:
    """What an agent algorithm adds under the values ``given``: DAgger's objective (``sft``: its update is SFT on the
    teacher's labels) where they name algorithm dagger and no objective. An objective given explicitly is kept and
    validated (``grpo`` with dagger is an error, not silently replaced). Used by ``from_flat``, ``default`` and
    ``tether train`` alike."""
    return {"objective": "sft"} if given.get("algorithm") == "dagger" and "objective" not in given else {}


@dataclass
class TrainConfig:
    """``tether train``'s config (module docstring). Build it from flat names with ``TrainConfig.from_flat``."""
    COMMAND = "train"
    ALIASES = TRL_ALIASES

    # task and data
    task: str = opt("arithmetic", "built-in task name (arithmetic, countdown) or a JSONL file path", group="task")
    task_options: dict | None = opt(
        None, 'JSON dict of task config fields, e.g. {"max_digits": 3, "ops": "+-"} (none: the default job\'s '
        'arithmetic is 1-2 digit addition, which the warm start brings to about 30 % so RL has room)', group="task")
    env: str | None = opt(None, "multi-turn episodes in an environment instead of a task: frozenlake, calculator, "
                                "countdown, guess, gym:ID (gymnasium toy_text), textarena:ID, or module:Factory / "
                                "file.py:Factory (its settings are the agent group; docs/agents.md)", group="task")
    skip_bad_rows: bool = opt(False, "skip malformed dataset rows (counted in the summary) instead of failing",
                              group="task")
    reward: list[str] | None = opt(None, "reward(s) for dataset tasks, each NAME[:WEIGHT]: a built-in (exact_match, "
                                         "numeric, ...) or module:function, e.g. my_rewards:score:0.5; several are "
                                         "summed with their weights (docs/tasks.md)", group="rewards")
    reward_timeout_s: float = opt(5.0, "a reward call slower than this marks the sample failed (reward 0)",
                                  group="rewards")
    reward_workers: int | None = opt(None, "worker processes that run user rewards (module:function, TRL), each call "
                                           "under a hard timeout; none: one per CPU core (at most the batch); 0: in "
                                           "the trainer's process, not isolated. Built-in rewards run in-process "
                                           "unless this is set (docs/tasks.md)", group="rewards")
    max_failed_reward_steps: int = opt(3, "stop after this many consecutive steps in which every reward call failed",
                                       group="rewards")
    # the objective
    objective: str = opt("grpo", "objective preset (tether objectives lists them)", group="objective")
    objective_args: dict | None = opt(None, 'JSON dict of preset hyper-parameter overrides, e.g. {"eps_high": 0.28}',
                                      group="objective")
    advantage: str | None = opt(None, "advantage estimator instead of the preset's own: grpo, dr_grpo, rloo, "
                                "reinforce_pp, rank_ema (FAKER-Air's centred rank + EMA z-score) (none: the preset's; tether objectives shows it)", group="objective")
    adv_ema_alpha: float = opt(0.05, "advantage rank_ema: EMA smoothing of the batch mean reward and its spread",
                               group="objective")
    adv_ema_coeff: float = opt(0.5, "advantage rank_ema: weight c of the EMA z-score against the centred rank "
                               "(A = (1 - c) rank + c z)", group="objective")
    class_bounds: str | None = opt(None, "class-wise reward (FAKER-Air): ascending class bounds b_0,...,b_K; the "
                                   "completion's number and the answer's fall in class k for b_k <= v < b_{k+1} "
                                   "(clamped to the ends), e.g. 0,15,35,75,800; replaces the task's reward (none: off)",
                                   group="class-wise reward")
    classwise: ClasswiseConfig | None = section(ClasswiseConfig, "class-wise reward on graded numeric answers",
                                                prefix="class_", switch=_class_on, needs="class_bounds",
                                                group="class-wise reward")
    dynamic_sampling: bool = opt(False, "drop groups whose rewards are all equal (DAPO)", group="objective")
    overlong_buffer: int | None = opt(None, "soft overlong penalty buffer L_buf in tokens (none: off)",
                                      group="objective")
    overlong_penalty: float = opt(1.0, "soft overlong penalty at the length limit (DAPO c)", group="objective")
    kl_placement: KLPlacement = opt(KLPlacement.NONE, "KL penalty to the initial policy: none, reward, loss "
                                    "(reward or loss needs kl_coef)", group="KL penalty")
    kl: KLConfig | None = section(KLConfig, "the KL penalty", prefix="kl_", switch=_kl_on,
                                  needs="kl_placement reward or loss", group="KL penalty")
    alp: bool = opt(False, "ALP: learnable Gaussian noise on every decoder layer's input in the training forward "
                           "only (pair with --objective alp or alp_seq, the ratio against the rollout policy)",
                    group="ALP perturbation")
    perturb: AlpConfig | None = section(AlpConfig, "ALP's perturbation", prefix="alp_", switch=_alp_on, needs="alp",
                                        group="ALP perturbation")
    drafts: str | None = opt(None, "weak-to-strong drafts in the training prompts (context only, outside the loss "
                             "mask; evaluation prompts stay plain): matched-correct, matched-wrong, mismatched-correct, "
                             "mismatched-wrong (none: off; docs/tasks.md)", group="task")
    draft_template: str = opt("Draft: {draft}\n{prompt}", "how a draft joins the prompt: a format string with "
                              "{draft} and {prompt}", group="task")
    # the run
    steps: int = opt(100, "number of RL steps (one optimiser update phase each)", group="run")
    seed: int = opt(0, "seed of everything: task sampling, generation, initialisation", group="run")
    prompts_per_step: int = opt(16, "prompts per step", group="run")
    group_size: int = opt(8, "completions per prompt (the GRPO group)", group="run")
    eval_size: int = opt(200, "held-out problems for greedy accuracy before and after", group="run")
    checkpoint_every: int = opt(10, "checkpoint every N steps (atomic)", group="run")
    eval_every: int | None = opt(None, "also evaluate held-out accuracy every N steps (eval/accuracy in that step's "
                                       "row and the trackers; mode sync; none: before and after only)", group="run")
    max_bad_steps: int = opt(3, "stop after this many consecutive non-finite steps", group="run")
    threads: int | None = opt(None, "torch CPU threads (none: all cores)", group="run")
    device: str = opt("cpu", "where the built-in model trains and samples: cpu or cuda (refused when "
                             "torch.cuda.is_available() is false); dist's broadcast uses gloo on cpu, nccl on cuda",
                      group="run")
    out: str | None = opt(None, "run directory (default runs/<task>-<objective>-<seed>)", group="run")
    resume: str | None = opt(None, "resume the run in this directory from its last checkpoint", group="run")
    overwrite: bool = opt(False, "start a fresh run in a run directory that is not empty (deletes its checkpoints "
                                 "and metrics; without it such a run is refused)", group="run")
    progress: bool = opt(True, "show progress: a bar in a terminal, plain lines on stdout otherwise (RUN/progress.log "
                               "is written either way)", group="run")
    log_every: int | None = opt(None, "steps between plain progress lines when stdout is not a terminal (none: about "
                                      "10 lines per phase)", group="run")
    quiet: bool = opt(False, "print nothing but errors: no progress and no end-of-run table (summary.json and "
                             "RUN/progress.log are still written)", group="run")
    mode: TrainMode = opt(TrainMode.SYNC, "execution mode: sync (generate, then train), async (concurrent; its "
                          "settings are the async group) or dist (rollout workers on Ray; the dist group)", group="run")
    # sampling
    max_new_tokens: int = opt(12, "generation length limit", group="sampling")
    temperature: float = opt(1.0, "sampling temperature (> 0)", group="sampling")
    top_k: int | None = opt(None, "top-k truncation at sampling (>= 1; none: off)", group="sampling")
    top_p: float | None = opt(None, "top-p truncation at sampling (in (0, 1]; none: off)", group="sampling")
    replay_truncation: bool = opt(True, "recompute log-probs under the same top-k/top-p support the engine used",
                                  group="sampling")
    # optimisation
    epochs: int = opt(1, "passes over each step's rollouts", group="optimisation")
    minibatches: int = opt(1, "optimiser steps per epoch (the rollout batch is split into this many)",
                           group="optimisation")
    micro_batch_size: int | None = opt(None, "sequences per forward/backward (gradient accumulation); none: whole "
                                       "mini-batch", group="optimisation")
    lr: float = opt(2e-5, "peak learning rate (AdamW; finite, > 0)", group="optimisation")
    lr_schedule: LRSchedule = opt(LRSchedule.CONSTANT, "learning-rate schedule after warm-up", group="optimisation")
    warmup_steps: int = opt(0, "linear warm-up optimiser steps", group="optimisation")
    weight_decay: float = opt(0.0, "AdamW weight decay (>= 0)", group="optimisation")
    grad_clip: float | None = opt(1.0, "global gradient-norm clip (> 0; none: no clipping, the norm is still logged)",
                                  group="optimisation")
    max_update_ratio: float | None = opt(1.0, "stop when one step moves the weights by more than this fraction of "
                                         "their norm, ||theta' - theta|| / ||theta|| (an exploding update; none: off)",
                                         group="optimisation")
    # model
    model: str = opt("tiny", "model: 'tiny' (built-in, warm-started) or a path", group="model")
    warmstart_steps: int = opt(400, "SFT warm-start steps for the built-in model (cached on disk)", group="model")
    chat_template: bool | None = opt(None, "wrap prompts in the tokenizer's chat template (none: iff it has one)",
                                     group="model")
    lora_r: int | None = opt(None, "LoRA rank for a Hugging Face model (none: full fine-tuning)", group="model")
    lora_alpha: float = opt(16.0, "LoRA scale numerator: the update is (lora_alpha / lora_r) B A", group="model")
    lora_target_modules: str = opt("all-linear", "LoRA target layers: 'all-linear' or names, e.g. q_proj,v_proj",
                                   group="model")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward (Hugging Face models; less memory)",
                                       group="model")
    bf16: bool = opt(False, "bfloat16: trainer forward under autocast, engine weights in bf16", group="model")
    # engine
    engine: EngineKind = opt(EngineKind.TORCH, "rollout engine: torch (in-process) or vllm (a vLLM server in its own "
                             "env, .venv-vllm from scripts/setup_vllm.sh; docs/engines.md)", group="engine")
    rollout_precision: RolloutPrecision = opt(RolloutPrecision.FP32, "rollout engine numerics: fp32, bf16, fp16, int8",
                                              group="engine")
    unified_precision: bool = opt(False, "trainer forward at the rollout precision too (Jet-RL); master weights fp32",
                                  group="engine")
    vllm_sync_every: int = opt(1, "engine vllm, sync mode: push weights to vLLM every k steps (tokens up to k-1 "
                                  "versions stale, recorded per token)", group="engine")
    share_engine_weights: bool = opt(False, "Hugging Face model, synchronous loop: the engine samples from the "
                                     "trainer's own fp32 weights (no second copy in memory)", group="engine")
    lean_decode: bool = opt(True, "Hugging Face model, torch engine: decode Llama-layout models (Llama, SmolLM2, "
                            "Qwen2, Qwen3, Mistral) on the lean path (fused weights, preallocated cache); "
                            "--no-lean-decode forces the stock transformers forward (docs/engines.md)",
                            group="engine")
    # logging
    tensorboard: bool = opt(False, "also log metrics to RUN/tensorboard (needs tensorboard)", group="logging")
    wandb: bool = opt(False, "also log metrics to Weights & Biases, offline, in RUN/wandb (needs wandb)",
                      group="logging")
    mlflow: bool = opt(False, "also log metrics to a local MLflow store in RUN/mlruns (needs mlflow)", group="logging")
    plots: bool = opt(True, "write RUN/reward.png and RUN/mismatch.png at the end (--no-plots: none, for sweeps "
                      "of many short runs; `tether report RUN` still draws its page from metrics.jsonl)", group="logging")
    # sections
    budget: BudgetConfig = section(BudgetConfig, "the mismatch budget", prefix="budget_", group="mismatch budget")
    async_: AsyncConfig | None = section(AsyncConfig, "the async loop", switch=_async_on, needs="mode 'async'",
                                         group="async (mode async)")
    dist: DistConfig | None = section(DistConfig, "the distributed driver", switch=_dist_on, needs="mode 'dist'",
                                      group="dist (mode dist)")
    agent: AgentConfig | None = section(AgentConfig, "multi-turn episodes", switch=_agent_on, needs="env",
                                        group="agent (with env)")

    @classmethod
    def from_flat(cls, **values: Any) -> TrainConfig:
        """The config from flat field names and values, exactly as the CLI and config files give them
        (``TrainConfig.from_flat(mode="async", max_staleness=2, kl_placement="reward", kl_coef=0.1)``)."""
        return build(cls, {**algorithm_defaults(values), **values})

    @classmethod
    def default(cls, **values: Any) -> TrainConfig:
        """The config ``tether train`` runs for these flat values: the default job (``DEFAULT_JOB``) under them,
        unless they pick a job of their own (``default_job``). ``TrainConfig.default()`` is a bare
        ``tether train``; ``TrainConfig()`` / ``from_flat()`` are the classic job (``tether train --classic``)."""
        return build(cls, {**default_job(values), **algorithm_defaults(values), **values})

    def __post_init__(self) -> None:
        coerce_fields(self)
        if self.mode is TrainMode.ASYNC and self.async_ is None:
            self.async_ = AsyncConfig()
        if self.mode is not TrainMode.ASYNC and self.async_ is not None:
            raise ValueError("config section 'async_' (AsyncConfig) needs mode 'async'")
        if self.mode is TrainMode.DIST and self.dist is None:
            self.dist = DistConfig()
        if self.eval_every is not None and self.mode is not TrainMode.SYNC:
            raise ValueError("config field 'eval_every' needs mode 'sync' (the async and dist engines are generating "
                             "while the trainer logs a step; their runs evaluate before and after)")
        if self.mode is not TrainMode.DIST and self.dist is not None:
            raise ValueError("config section 'dist' (DistConfig) needs mode 'dist'")
        if self.mode is TrainMode.DIST and (self.env is not None or self.engine is not EngineKind.TORCH):
            raise ValueError("mode 'dist' runs single-turn tasks on the torch engine for now (no env, engine torch)")
        if self.env is not None and self.agent is None:
            self.agent = AgentConfig()
        if self.env is None and self.agent is not None:
            raise ValueError("config section 'agent' (AgentConfig) needs env")
        if self.env is not None:
            self._validate_agent()
        if self.alp != (self.perturb is not None):
            if self.alp:
                self.perturb = AlpConfig()
            else:
                raise ValueError("config section 'perturb' (AlpConfig) needs alp")
        if self.alp:
            self._validate_alp()
        if (self.kl_placement is KLPlacement.NONE) != (self.kl is None):
            raise ValueError("config field 'kl_coef' must be > 0 when kl_placement is not 'none'"
                             if self.kl is None else "config section 'kl' (KLConfig) needs kl_placement reward or loss")
        if self.kl is not None and self.kl.estimator == "k3_is" and self.kl_placement is not KLPlacement.LOSS:
            raise ValueError("config field 'kl_estimator' k3_is needs kl_placement 'loss' (its ratio carries the gradient)")
        valid = (*ADVANTAGES, *STATEFUL_ADVANTAGES)
        _check(self.advantage is None or self.advantage in valid, "advantage",
               f"must be one of {', '.join(valid)} or none", repr(self.advantage))
        _check(0 < self.adv_ema_alpha <= 1, "adv_ema_alpha", "must be in (0, 1]", self.adv_ema_alpha)
        _check(0 <= self.adv_ema_coeff <= 1, "adv_ema_coeff", "must be in [0, 1]", self.adv_ema_coeff)
        if self.classwise is not None:
            self._validate_classwise()
        if self.classwise is not None and self.mode is not TrainMode.SYNC:
            raise ValueError("config field 'class_bounds' needs mode 'sync' (the step's rows must line up with its "
                             f"examples), got {self.mode.value!r}")
        if self.kl is not None and self.kl.target is not None and self.old_logits is OldLogits.LOGLINEAR \
                and self.kl_placement is not KLPlacement.REWARD:
            raise ValueError("config field 'kl_target' needs the step's recomputed log-probs, which old_logits "
                             "'loglinear' skips (use recompute or snapshot)")
        if self.classwise is not None and self.env is not None:
            raise ValueError("config field 'class_bounds' needs a task with answers (it bins each completion's number "
                             "against its example's); an environment scores its own episodes")
        self._validate_drafts()
        self._check_ranges()
        self._check_rewards()
        if (self.prompts_per_step * self.group_size) % self.minibatches:
            raise ValueError("config field 'minibatches' must divide prompts_per_step * group_size")
        if self.overlong_buffer is not None and not 0 < self.overlong_buffer <= self.max_new_tokens:
            raise ValueError("config field 'overlong_buffer' must be in [1, max_new_tokens]")
        if self.overwrite and self.resume:
            raise ValueError("config field 'overwrite' cannot be combined with 'resume' (a resume continues the run)")
        self._validate_offpolicy()

    @property
    def class_bound_values(self) -> tuple[float, ...]:
        return tuple(float(x) for x in (self.class_bounds or "").split(","))

    def _validate_classwise(self) -> None:
        try:
            values = self.class_bound_values
        except ValueError:
            values = ()
        ok = len(values) >= 2 and all(math.isfinite(v) for v in values) and all(b > a for a, b in zip(values, values[1:]))
        _check(ok, "class_bounds", "must be at least two strictly ascending comma-separated numbers",
               repr(self.class_bounds))
        h = self.classwise.high_from
        _check(0 <= h <= len(values) - 2, "class_high_from", f"must be a class index in [0, {len(values) - 2}]", h)

    def _validate_drafts(self) -> None:
        from tether.tasks.drafts import VARIANTS, check_template

        _check(self.drafts is None or self.drafts in VARIANTS, "drafts", f"must be one of {', '.join(VARIANTS)} or "
               "none", repr(self.drafts))
        problem = check_template(self.draft_template)
        _check(problem is None, "draft_template", problem or "", repr(self.draft_template))
        _check(self.drafts is None or self.env is None, "drafts", "needs a task with answers, not an environment",
               repr(self.drafts))

    def _validate_alp(self) -> None:
        if self.mode is TrainMode.DIST:
            raise ValueError("config field 'alp' is not supported with mode 'dist' yet (the sharded trainer ranks "
                             "would each need the perturbation's scales)")
        if self.share_engine_weights:
            raise ValueError("config field 'alp' excludes share_engine_weights (the engine would sample from the "
                             "perturbed model; ALP perturbs the training forward only)")
        if self.old_logits is not OldLogits.RECOMPUTE:
            raise ValueError("config field 'alp' needs old_logits 'recompute': ALP's ratio is against the rollout "
                             "policy (bypass mode), so no other anchor is kept")

    def _validate_agent(self) -> None:
        algo = self.agent.algorithm
        a = self.agent
        for name in ("dart_adaptive", "dart_reuse"):
            _check(not getattr(a, name) or self.mode is TrainMode.SYNC, name,
                   "needs mode 'sync' (its success history and cache are updated between steps)", getattr(a, name))
        _check(a.dart_entropy_top is None or self.old_logits is not OldLogits.LOGLINEAR, "dart_entropy_top",
               "needs the trainer's entropy, which old_logits 'loglinear' never computes", a.dart_entropy_top)
        if a.dart_adaptive:
            hi = a.dart_max_rollouts if a.dart_max_rollouts is not None else 2 * self.group_size
            _check(a.dart_min_rollouts <= self.group_size <= hi, "dart_min_rollouts",
                   f"and dart_max_rollouts ({hi}) must bracket group_size {self.group_size} (the step's total "
                   "stays prompts_per_step * group_size)", a.dart_min_rollouts)
        if algo != "rl" and self.mode is not TrainMode.SYNC:
            raise ValueError(f"config field 'algorithm' {algo} needs mode 'sync' (its episodes and cache are built "
                             "between steps)")
        if algo == "dagger":
            teacher = self.agent.dagger_teacher
            _check(teacher != "builtin" or self.model == "tiny", "dagger_teacher",
                   "builtin needs the built-in student (--model tiny: the teacher shares its tokenizer)", repr(teacher))
            _check(teacher in ("scripted", "builtin") or self.model != "tiny", "dagger_teacher",
                   "a model directory needs a Hugging Face student sharing its tokenizer (--model PATH)", repr(teacher))
            _check(self.objective in ("sft", "pear"), "objective", "must be sft (or pear) with algorithm dagger "
                   "(SFT on the teacher's labels)", repr(self.objective))
        elif self.objective in ("sft", "pear"):
            raise ValueError(f"config field 'objective' {self.objective} trains on labels: with env use --algorithm "
                             "dagger (the episodes' own tokens are sampled, not labelled)")
        if self.overlong_buffer is not None:
            raise ValueError("config field 'overlong_buffer' is a single-turn length penalty; with env the episode's "
                             "token budget is max_episode_tokens")
        if self.async_ is not None and self.async_.staleness_policy is StalenessPolicy.DROP:
            raise ValueError("config field 'staleness_policy' drop is not supported with env yet (its refill "
                             "regenerates single-turn groups); use wait or downweight")
        if self.engine is EngineKind.VLLM:
            raise ValueError("config field 'engine' vllm is not supported with env yet (episodes run on the torch "
                             "engine)")

    def _check_ranges(self) -> None:
        for name in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "epochs", "minibatches",
                     "checkpoint_every", "max_bad_steps", "eval_size", "max_failed_reward_steps"):
            _check(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))
        for name in ("warmstart_steps", "warmup_steps"):
            _check(getattr(self, name) >= 0, name, "must be >= 0", getattr(self, name))
        _check(self.reward_workers is None or self.reward_workers >= 0, "reward_workers", "must be >= 0 or none",
               self.reward_workers)
        for name in ("micro_batch_size", "threads", "top_k", "log_every", "eval_every"):
            v = getattr(self, name)
            _check(v is None or v >= 1, name, "must be >= 1 or none", v)
        _check(self.lr > 0, "lr", "must be finite and > 0", self.lr)
        _check(self.device in ("cpu", "cuda"), "device", "must be cpu or cuda", repr(self.device))
        if self.device == "cuda":
            import torch

            _check(torch.cuda.is_available(), "device", "cuda needs a CUDA GPU and a CUDA build of torch "
                   "(torch.cuda.is_available() is false here)", repr(self.device))
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0", self.weight_decay)
        _check(self.grad_clip is None or self.grad_clip > 0, "grad_clip",
               "must be > 0 or none (a negative clip flips every gradient, 0 zeroes every update)", self.grad_clip)
        _check(self.max_update_ratio is None or self.max_update_ratio > 0, "max_update_ratio", "must be > 0 or none",
               self.max_update_ratio)
        _check(self.temperature > 0, "temperature", "must be finite and > 0", self.temperature)
        _check(self.top_p is None or 0 < self.top_p <= 1, "top_p", "must be in (0, 1] or none", self.top_p)
        _check(self.reward_timeout_s > 0, "reward_timeout_s", "must be finite and > 0", self.reward_timeout_s)
        _check(self.overlong_penalty >= 0, "overlong_penalty", "must be >= 0", self.overlong_penalty)
        _check(math.isfinite(self.lora_alpha) and self.lora_alpha > 0, "lora_alpha", "must be > 0", self.lora_alpha)
        _check(self.lora_r is None or self.lora_r >= 1, "lora_r", "must be >= 1 or none", self.lora_r)

    def _check_rewards(self) -> None:
        if self.reward is None:
            return
        import tether.tasks.math_reward  # noqa: F401  (registers math_verify)
        import tether.tasks.registry  # noqa: F401  (registers the tasks' built-in rewards: countdown)
        from tether.tasks.rewards import RewardLoadError, split_weight

        _check(len(self.reward) >= 1, "reward", "needs at least one NAME[:WEIGHT] (or none)", self.reward)
        seen: set[str] = set()
        for text in self.reward:
            try:
                spec, _ = split_weight(text)
            except RewardLoadError as e:
                raise ValueError(f"config field 'reward': {e}") from None
            _check(spec not in seen, "reward", f"names {spec!r} twice", self.reward)
            seen.add(spec)

    @property
    def rewards(self) -> list[tuple[str, float]]:
        """The ``reward`` entries as ``(spec, weight)`` pairs (derived; empty when none is given)."""
        from tether.tasks.rewards import split_weight

        return [split_weight(text) for text in self.reward or []]

    @property
    def task_stem(self) -> str:
        """The task's name for default run directories (a file's stem)."""
        from pathlib import Path

        if self.env is not None:  # frozenlake, pkg.mod:Factory, path/my_env.py:Factory
            where = self.env.rpartition(":")[0] or self.env
            return "env-" + (Path(where).stem if where.endswith(".py") else where.rpartition(".")[2])
        return Path(self.task).stem

    @property
    def lag(self) -> int:
        """Versions the async engine runs ahead of the trainer (0 in sync mode)."""
        return self.async_.lag if self.async_ is not None else 0

    @property
    def old_logits(self) -> OldLogits:
        """How pi_old is obtained (sync: recompute, the only exact choice for fresh rollouts)."""
        return self.async_.old_logits if self.async_ is not None else OldLogits.RECOMPUTE

    def _validate_offpolicy(self) -> None:
        if self.unified_precision and self.rollout_precision is RolloutPrecision.FP32:
            raise ValueError("config field 'unified_precision' needs a reduced 'rollout_precision' (bf16, fp16, int8)")
        if self.model != "tiny" and self.rollout_precision != RolloutPrecision.FP32:
            raise ValueError("config field 'rollout_precision' applies to the built-in model; for a Hugging Face model "
                             "use bf16 (trainer autocast, bf16 engine weights)")
        if self.share_engine_weights and self.mode != TrainMode.SYNC:
            raise ValueError("config field 'share_engine_weights' needs mode 'sync' (an async engine samples while the "
                             "trainer updates, so it needs its own copy)")
        if self.share_engine_weights and (self.bf16 or self.gradient_checkpointing):
            raise ValueError("config field 'share_engine_weights' excludes bf16 (the engine would need its own bf16 "
                             "copy) and gradient_checkpointing (the engine switches the shared model to eval mode)")
        self._validate_engine()
        for name in ("lora_r", "gradient_checkpointing", "chat_template", "share_engine_weights"):
            if self.model == "tiny" and getattr(self, name):
                raise ValueError(f"config field '{name}' needs a Hugging Face model (--model PATH or smollm2), "
                                 "not the built-in 'tiny'")
        if not self.lean_decode and (self.model == "tiny" or self.engine is not EngineKind.TORCH):
            raise ValueError("config field 'lean_decode' (off) needs a Hugging Face model and engine 'torch' (the "
                             "built-in model and vLLM have their own decode paths)")
    def _validate_engine(self) -> None:
        if self.vllm_sync_every < 1:
            raise ValueError(f"config field 'vllm_sync_every' must be >= 1, got {self.vllm_sync_every}")
        if self.engine is EngineKind.TORCH:
            if self.vllm_sync_every != 1:
                raise ValueError("config field 'vllm_sync_every' needs engine 'vllm'")
            return
        if self.vllm_sync_every != 1 and self.mode is not TrainMode.SYNC:
            raise ValueError("config field 'vllm_sync_every' needs mode 'sync' (the async loop bounds staleness with "
                             "max_staleness / rollout_lag)")
        if self.rollout_precision is RolloutPrecision.INT8:
            raise ValueError("config field 'rollout_precision': engine 'vllm' runs fp32, bf16 or fp16, not int8")
        for name in ("lora_r", "share_engine_weights"):
            if getattr(self, name):
                raise ValueError(f"config field '{name}' is not supported with engine 'vllm' (vLLM loads the full "
                                 "model's weights by their Hugging Face names)")
        if self.top_p is not None and self.top_p < 1.0 and self.model != "tiny" and self.replay_truncation:
            raise ValueError("config field 'top_p' with engine 'vllm' and a Hugging Face model cannot be replayed "
                             "(the support size needs full-vocabulary log-probs); use top_k or --no-replay-truncation")

    @property
    def vllm_dtype(self) -> str:
        """vLLM's dtype, derived: rollout_precision bf16 / fp16, or bf16 for a Hugging Face model; else float32."""
        if self.rollout_precision is RolloutPrecision.FP16:
            return "float16"
        if self.rollout_precision is RolloutPrecision.BF16 or (self.bf16 and self.model != "tiny"):
            return "bfloat16"
        return "float32"
