"""The one typed config of ``tether distill`` (flags generated from it; ``--config FILE`` reads TOML/YAML).

The defaults are the CPU demo on 1-2 digit addition: the teacher is the built-in tiny model
warm-started for 1,500 steps (about 95 % held-out accuracy); the student is the same architecture
warm-started for 400 steps (about 30 %, the RL job's starting point). ``student_d_model`` /
``student_layers`` give a smaller student.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from tether.configs import opt


class Algorithm(str, enum.Enum):
    OPD = "opd"
    OPSD = "opsd"
    SFT = "sft"
    PEAR = "pear"
    CAOPD = "caopd"
    BLACKBOX = "blackbox"
    RL = "rl"


class OPSDTeacher(str, enum.Enum):
    FIXED = "fixed"
    EMA = "ema"


DEFAULT_OBJECTIVE = {
    Algorithm.OPD: "distill_reverse_kl",
    Algorithm.OPSD: "distill_jsd",
    Algorithm.SFT: "sft",
    Algorithm.PEAR: "pear",
    Algorithm.CAOPD: "distill_forward_kl",
    Algorithm.BLACKBOX: "grpo",
    Algorithm.RL: "grpo",
}
"""The preset each algorithm uses when ``objective`` is not given."""

DEFAULT_EMA_DECAY = {Algorithm.OPSD: 0.999, Algorithm.CAOPD: 0.99}
"""The EMA teacher's decay when ``teacher_ema_decay`` is not given (OPSD ``use_ema_teacher``; CaOPD
``ref_model_mixup_alpha = 0.01``)."""


@dataclass
class DistillConfig:
    algorithm: Algorithm = opt(Algorithm.OPD, "opd, opsd, sft, pear, caopd, blackbox (text-only teacher) or rl (no teacher)")
    objective: str | None = opt(None, "objective preset (none: the algorithm's default: opd -> distill_reverse_kl (full vocabulary), opsd -> "
                                "distill_jsd, sft -> sft, pear -> pear, caopd -> distill_forward_kl, blackbox/rl -> grpo)")
    objective_args: dict | None = opt(None, 'JSON dict of preset overrides, e.g. {"support": "topk_teacher", "k": 8}')
    task: str = opt("arithmetic", "built-in task name or a JSONL file path")
    task_options: dict | None = opt(None, "JSON dict of task config fields (none: 1-2 digit addition)")
    reward: str | None = opt(None, "reward for JSONL tasks: exact_match, numeric or module:function")
    teacher: str = opt("builtin", "'builtin' (the tiny model, longer warm start) or a transformers model directory "
                       "sharing the student's tokenizer")
    teacher_d_model: int = opt(192, "built-in teacher hidden size")
    teacher_layers: int = opt(4, "built-in teacher transformer blocks")
    teacher_warmstart_steps: int = opt(1500, "built-in teacher SFT steps (cached on disk)")
    teacher_seed: int = opt(0, "built-in teacher initialisation seed (fixed across student seeds: one teacher)")
    student_d_model: int = opt(192, "built-in student hidden size")
    student_layers: int = opt(4, "built-in student transformer blocks")
    student_warmstart_steps: int = opt(400, "built-in student SFT steps (cached on disk)")
    student_seed: int = opt(0, "built-in student initialisation seed (fixed across run seeds: one starting student)")
    init: str | None = opt(None, "start the student from this state dict (e.g. <run>/student.pt of an earlier run)")
    data: str | None = opt(None, "sft/pear: JSONL of {prompt, completion, logp_behaviour} rows instead of "
                           "sampling the teacher")
    save_data: str | None = opt(None, "sft/pear: also write the teacher samples (with behaviour log-probs) here")
    opsd_template: str = opt("{solution}\n{prompt}", "opsd: the teacher's privileged context ({prompt}, {solution})")
    opsd_teacher: OPSDTeacher = opt(OPSDTeacher.FIXED, "opsd: the teacher's weights: fixed (the student's initial "
                                    "weights) or ema (an EMA of the student's weights)")
    teacher_ema_decay: float | None = opt(None, "opsd with opsd_teacher ema, caopd: EMA teacher decay d in [0, 1], "
                                          "theta_T <- d theta_T + (1 - d) theta_S after every step (none: opsd 0.999, "
                                          "caopd 0.99)")
    confidence_label: str = opt("Confidence: ", "caopd: the label before the stated confidence")
    teacher_samples: int = opt(4, "blackbox: teacher completions per prompt used as references")
    teacher_token_budget: int | None = opt(None, "stop once this many teacher tokens were spent (none: run all steps)")
    steps: int = opt(300, "optimiser steps")
    seed: int = opt(0, "seed of everything")
    prompts_per_step: int = opt(16, "prompts per step")
    group_size: int = opt(4, "student completions per prompt")
    max_new_tokens: int = opt(8, "generation length limit")
    temperature: float = opt(1.0, "sampling temperature (student and teacher)")
    top_k: int | None = opt(None, "top-k truncation at sampling (none: off)")
    top_p: float | None = opt(None, "top-p truncation at sampling (none: off)")
    lr: float = opt(1e-4, "peak learning rate (AdamW)")
    warmup_steps: int = opt(10, "linear learning-rate warm-up steps (fresh Adam moments on a trained model)")
    grad_clip: float = opt(1.0, "global gradient-norm clip")
    eval_size: int = opt(200, "held-out problems for greedy accuracy before and after")
    reward_timeout_s: float = opt(5.0, "a reward call slower than this scores 0")
    threads: int | None = opt(None, "torch CPU threads (none: all cores)")
    out: str | None = opt(None, "run directory (default runs/distill-<algorithm>-<seed>)")
    progress: bool = opt(True, "show a progress bar")

    def __post_init__(self) -> None:
        for name, kind in (("algorithm", Algorithm), ("opsd_teacher", OPSDTeacher)):  # accept the enum's value
            try:
                setattr(self, name, kind(getattr(self, name)))
            except ValueError:
                raise ValueError(f"config field '{name}' must be one of {[k.value for k in kind]}, "
                                 f"got {getattr(self, name)!r}") from None
        for name in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "eval_size", "teacher_samples",
                     "teacher_d_model", "teacher_layers", "student_d_model", "student_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"config field '{name}' must be >= 1, got {getattr(self, name)}")
        for name in ("teacher_warmstart_steps", "student_warmstart_steps", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"config field '{name}' must be >= 0, got {getattr(self, name)}")
        if self.teacher_token_budget is not None and self.teacher_token_budget < 1:
            raise ValueError(f"config field 'teacher_token_budget' must be >= 1, got {self.teacher_token_budget}")
        if not self.lr > 0:
            raise ValueError(f"config field 'lr' must be > 0, got {self.lr}")
        if self.data is not None and self.algorithm not in (Algorithm.SFT, Algorithm.PEAR):
            raise ValueError("config field 'data' applies to algorithm sft or pear only")
        need = len(self.confidence_label) + 8  # answer (>= 2) + newline + label + "0.00" + eos
        if self.algorithm is Algorithm.CAOPD and self.max_new_tokens < need:
            raise ValueError(f"config field 'max_new_tokens' must be >= {need} for caopd with confidence_label "
                             f"{self.confidence_label!r}, got {self.max_new_tokens}")
        if self.teacher_ema_decay is not None:
            if not self.uses_ema_teacher:
                raise ValueError("config field 'teacher_ema_decay' applies to algorithm caopd, or opsd with "
                                 "opsd_teacher 'ema', only")
            if not 0.0 <= self.teacher_ema_decay <= 1.0:
                raise ValueError(f"config field 'teacher_ema_decay' must be in [0, 1], got {self.teacher_ema_decay}")
        if "{prompt}" not in self.opsd_template or "{solution}" not in self.opsd_template:
            raise ValueError("config field 'opsd_template' must contain {prompt} and {solution}")

    @property
    def preset_name(self) -> str:
        return self.objective or DEFAULT_OBJECTIVE[self.algorithm]

    @property
    def uses_ema_teacher(self) -> bool:
        return self.algorithm is Algorithm.CAOPD or (self.algorithm is Algorithm.OPSD
                                                     and self.opsd_teacher is OPSDTeacher.EMA)

    @property
    def ema_decay(self) -> float | None:
        """The EMA teacher's decay, or None when the algorithm has no EMA teacher."""
        if not self.uses_ema_teacher:
            return None
        return self.teacher_ema_decay if self.teacher_ema_decay is not None else DEFAULT_EMA_DECAY[self.algorithm]
