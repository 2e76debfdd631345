"""The one typed config of ``tether train``. Every field has a default and a one-line help; the
CLI flags are generated from it (``tether train --help``) and ``--config FILE`` reads TOML/YAML."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from tether.configs import opt
from tether.meter.budget import BudgetAction, MeterRatio


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


class StalenessPolicy(str, enum.Enum):
    WAIT = "wait"
    DROP = "drop"
    DOWNWEIGHT = "downweight"


class OldLogits(str, enum.Enum):
    RECOMPUTE = "recompute"
    SNAPSHOT = "snapshot"
    EWMA = "ewma"
    LOGLINEAR = "loglinear"


class EngineKind(str, enum.Enum):
    TORCH = "torch"
    VLLM = "vllm"


class RolloutPrecision(str, enum.Enum):
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    INT8 = "int8"


@dataclass
class TrainConfig:
    task: str = opt("arithmetic", "built-in task name (arithmetic, countdown) or a JSONL file path")
    task_options: dict | None = opt(
        None, 'JSON dict of task config fields, e.g. {"max_digits": 3, "ops": "+-"} (none: the default job\'s '
        'arithmetic is 1-2 digit addition, which the warm start brings to about 30 % so RL has room)')
    reward: str | None = opt(None, "reward for JSONL tasks: exact_match, numeric or module:function")
    skip_bad_rows: bool = opt(False, "skip malformed dataset rows (counted in the summary) instead of failing")
    reward_timeout_s: float = opt(5.0, "a reward call slower than this marks the sample failed (reward 0)")
    reward_workers: int | None = opt(None, "worker processes that run user rewards (module:function, TRL), each call "
                                           "under a hard timeout; none: one per CPU core (at most the batch); 0: in "
                                           "the trainer's process, not isolated. Built-in rewards run in-process "
                                           "unless this is set (docs/tasks.md)")
    max_failed_reward_steps: int = opt(3, "stop after this many consecutive steps in which every reward call failed")
    model: str = opt("tiny", "model: 'tiny' (built-in, warm-started) or a path")
    objective: str = opt("grpo", "objective preset (tether objectives lists them)")
    objective_args: dict | None = opt(None, 'JSON dict of preset hyper-parameter overrides, e.g. {"eps_high": 0.28}')
    steps: int = opt(100, "number of RL steps (one optimiser update phase each)")
    seed: int = opt(0, "seed of everything: task sampling, generation, initialisation")
    prompts_per_step: int = opt(16, "prompts per step")
    group_size: int = opt(8, "completions per prompt (the GRPO group)")
    max_new_tokens: int = opt(12, "generation length limit")
    temperature: float = opt(1.0, "sampling temperature")
    top_k: int | None = opt(None, "top-k truncation at sampling (none: off)")
    top_p: float | None = opt(None, "top-p truncation at sampling (none: off)")
    replay_truncation: bool = opt(True, "recompute log-probs under the same top-k/top-p support the engine used")
    epochs: int = opt(1, "passes over each step's rollouts")
    minibatches: int = opt(1, "optimiser steps per epoch (the rollout batch is split into this many)")
    micro_batch_size: int | None = opt(None, "sequences per forward/backward (gradient accumulation); none: whole mini-batch")
    lr: float = opt(2e-5, "peak learning rate (AdamW)")
    lr_schedule: LRSchedule = opt(LRSchedule.CONSTANT, "learning-rate schedule after warm-up")
    warmup_steps: int = opt(0, "linear warm-up optimiser steps")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    grad_clip: float = opt(1.0, "global gradient-norm clip")
    kl_coef: float = opt(0.0, "coefficient of the KL to the reference (initial) policy")
    kl_estimator: str = opt("k3", "KL estimator: k1, k2, k3, k3plus")
    kl_placement: KLPlacement = opt(KLPlacement.NONE, "where the KL goes: none, reward, loss")
    dynamic_sampling: bool = opt(False, "drop groups whose rewards are all equal (DAPO)")
    overlong_buffer: int | None = opt(None, "soft overlong penalty buffer L_buf in tokens (none: off)")
    overlong_penalty: float = opt(1.0, "soft overlong penalty at the length limit (DAPO c)")
    warmstart_steps: int = opt(400, "SFT warm-start steps for the built-in model (cached on disk)")
    eval_size: int = opt(200, "held-out problems for greedy accuracy before and after")
    checkpoint_every: int = opt(10, "checkpoint every N steps (atomic)")
    max_bad_steps: int = opt(3, "stop after this many consecutive non-finite steps")
    threads: int | None = opt(None, "torch CPU threads (none: all cores)")
    out: str | None = opt(None, "run directory (default runs/<task>-<objective>-<seed>)")
    resume: str | None = opt(None, "resume the run in this directory from its last checkpoint")
    progress: bool = opt(True, "show a progress bar")
    budget_ratio: MeterRatio = opt(MeterRatio.TOTAL, "mismatch budget: the ratio its thresholds read: total (pi_old/mu) or engine (fresh tokens)")
    budget_min_ess_token: float | None = opt(None, "mismatch budget: alarm when meter/<ratio>/ess_token < this (none: off)")
    budget_min_ess_seq: float | None = opt(None, "mismatch budget: alarm when meter/<ratio>/ess_seq < this (none: off)")
    budget_max_abs_logr_p99: float | None = opt(None, "mismatch budget: alarm when meter/<ratio>/abs_logr_p99 > this (none: off)")
    budget_max_kl: float | None = opt(None, "mismatch budget: alarm when meter/<ratio>/kl_k3 > this (none: off)")
    budget_action: BudgetAction = opt(BudgetAction.WARN, "on a budget alarm: warn, tighten (the correction), lower_lr, stop")
    budget_lr_factor: float = opt(0.5, "lower_lr multiplies the learning rate by this on every step with an alarm")
    budget_tighten_factor: float = opt(0.5, "tighten moves caps, bands and clip ranges this factor closer to 1 per alarm step")
    # off-policy (docs/async.md)
    mode: TrainMode = opt(TrainMode.SYNC, "execution mode: sync (generate, then train) or async (concurrent)")
    max_staleness: int = opt(1, "async: bound k on token age (trainer version - generating version)")
    staleness_policy: StalenessPolicy = opt(StalenessPolicy.WAIT, "async: tokens older than k: wait, drop, downweight")
    rollout_lag: int | None = opt(None, "async: the engine runs this many versions ahead of the trainer: batch s "
                                        "starts on version s - lag (none: max_staleness)")
    freshest_weights: bool = opt(False, "async: start batches and chunks on the newest published weights instead of "
                                        "exactly version s - lag (real-time, not reproducible)")
    partial_chunk_tokens: int | None = opt(None, "async: generate in chunks of this many tokens, picking up new "
                                                 "weights between chunks (partial rollouts); none: whole completions")
    downweight_decay: float = opt(0.5, "async downweight: a token of age a > k gets weight decay^(a - k)")
    old_logits: OldLogits = opt(OldLogits.RECOMPUTE, "how pi_old is obtained: recompute, snapshot, ewma, loglinear")
    ewma_beta: float = opt(0.9, "old_logits=ewma: EWMA decay of the proximal weights (PPO-EWMA beta)")
    rollout_precision: RolloutPrecision = opt(RolloutPrecision.FP32, "rollout engine numerics: fp32, bf16, fp16, int8")
    unified_precision: bool = opt(False, "trainer forward at the rollout precision too (Jet-RL); master weights fp32")
    chat_template: bool | None = opt(None, "wrap prompts in the tokenizer's chat template (none: iff it has one)")
    lora_r: int | None = opt(None, "LoRA rank for a Hugging Face model (none: full fine-tuning)")
    lora_alpha: float = opt(16.0, "LoRA scale numerator: the update is (lora_alpha / lora_r) B A")
    lora_target_modules: str = opt("all-linear", "LoRA target layers: 'all-linear' or names, e.g. q_proj,v_proj")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward (Hugging Face models; less memory)")
    bf16: bool = opt(False, "bfloat16: trainer forward under autocast, engine weights in bf16")
    tensorboard: bool = opt(False, "also log metrics to RUN/tensorboard (needs tensorboard)")
    wandb: bool = opt(False, "also log metrics to Weights & Biases, offline, in RUN/wandb (needs wandb)")
    mlflow: bool = opt(False, "also log metrics to a local MLflow store in RUN/mlruns (needs mlflow)")
    engine: EngineKind = opt(EngineKind.TORCH, "rollout engine: torch (in-process) or vllm (a vLLM server in its own "
                             "env, .venv-vllm from scripts/setup_vllm.sh; docs/engines.md)")
    vllm_sync_every: int = opt(1, "engine vllm, sync mode: push weights to vLLM every k steps (tokens up to k-1 "
                                  "versions stale, recorded per token)")
    share_engine_weights: bool = opt(False, "Hugging Face model, synchronous loop: the engine samples from the "
                                     "trainer's own fp32 weights (no second copy in memory)")

    def __post_init__(self) -> None:
        positive = ["steps", "prompts_per_step", "group_size", "max_new_tokens", "epochs", "minibatches",
                    "checkpoint_every", "max_bad_steps", "eval_size", "max_failed_reward_steps"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"config field '{name}' must be >= 1, got {getattr(self, name)}")
        for name in ("warmstart_steps", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"config field '{name}' must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"config field 'lr' must be > 0, got {self.lr}")
        if self.kl_coef < 0:
            raise ValueError(f"config field 'kl_coef' must be >= 0, got {self.kl_coef}")
        if self.kl_placement is not KLPlacement.NONE and self.kl_coef == 0:
            raise ValueError("config field 'kl_coef' must be > 0 when kl_placement is not 'none'")
        if self.kl_estimator not in ("k1", "k2", "k3", "k3plus"):
            raise ValueError(f"config field 'kl_estimator' must be one of k1, k2, k3, k3plus, got {self.kl_estimator!r}")
        if (self.prompts_per_step * self.group_size) % self.minibatches:
            raise ValueError("config field 'minibatches' must divide prompts_per_step * group_size")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"config field 'micro_batch_size' must be >= 1, got {self.micro_batch_size}")
        if self.reward_timeout_s <= 0:
            raise ValueError(f"config field 'reward_timeout_s' must be > 0, got {self.reward_timeout_s}")
        if self.reward_workers is not None and self.reward_workers < 0:
            raise ValueError(f"config field 'reward_workers' must be >= 0 or none, got {self.reward_workers}")
        if self.overlong_buffer is not None and not 0 < self.overlong_buffer <= self.max_new_tokens:
            raise ValueError("config field 'overlong_buffer' must be in [1, max_new_tokens]")
        from tether.train.mismatch_control import validate_config  # the budget_* fields

        validate_config(self)
        self._validate_offpolicy()

    @property
    def lag(self) -> int:
        """Versions the async engine runs ahead of the trainer (derived: rollout_lag, else max_staleness)."""
        return self.max_staleness if self.rollout_lag is None else self.rollout_lag

    def _validate_offpolicy(self) -> None:
        if self.max_staleness < 0:
            raise ValueError(f"config field 'max_staleness' must be >= 0, got {self.max_staleness}")
        if self.rollout_lag is not None and self.rollout_lag < 0:
            raise ValueError(f"config field 'rollout_lag' must be >= 0 or none, got {self.rollout_lag}")
        if self.partial_chunk_tokens is not None and self.partial_chunk_tokens < 1:
            raise ValueError(f"config field 'partial_chunk_tokens' must be >= 1 or none, got {self.partial_chunk_tokens}")
        if not 0 < self.downweight_decay <= 1:
            raise ValueError(f"config field 'downweight_decay' must be in (0, 1], got {self.downweight_decay}")
        if not 0 <= self.ewma_beta <= 1:
            raise ValueError(f"config field 'ewma_beta' must be in [0, 1], got {self.ewma_beta}")
        if self.mode is TrainMode.SYNC:
            for name, default in (("rollout_lag", None), ("partial_chunk_tokens", None), ("freshest_weights", False),
                                  ("old_logits", OldLogits.RECOMPUTE)):
                if getattr(self, name) != default:
                    raise ValueError(f"config field '{name}' needs mode 'async' (sync rollouts are on-policy)")
        if self.staleness_policy is StalenessPolicy.WAIT and self.lag > self.max_staleness:
            raise ValueError("config field 'rollout_lag' exceeds 'max_staleness' under staleness_policy 'wait' "
                             "(wait never admits a batch older than max_staleness)")
        if self.unified_precision and self.rollout_precision is RolloutPrecision.FP32:
            raise ValueError("config field 'unified_precision' needs a reduced 'rollout_precision' (bf16, fp16, int8)")
        if self.lora_r is not None and self.lora_r < 1:
            raise ValueError(f"config field 'lora_r' must be >= 1, got {self.lora_r}")
        if not self.lora_alpha > 0:
            raise ValueError(f"config field 'lora_alpha' must be > 0, got {self.lora_alpha}")
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
