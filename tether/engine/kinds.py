"""The engine's own choices, as enums: which engine samples, and at which numerics.

They live here, not in the trainer's config, so ``tether.engine`` depends on nothing above it; the
configs (``tether.train.config``) import them from here and the CLI turns their values into flags.
"""

from __future__ import annotations

import enum


class EngineKind(str, enum.Enum):
    """Which rollout engine samples: ``torch`` (in-process, :class:`~tether.engine.torch_engine.TorchEngine`)
    or ``vllm`` (a vLLM server in its own environment, :class:`~tether.engine.vllm_engine.VLLMEngine`)."""

    TORCH = "torch"
    VLLM = "vllm"


class RolloutPrecision(str, enum.Enum):
    """The engine's numerics (:mod:`tether.engine.precision`): fp32 (the trainer's), bf16 / fp16
    (weights and activations cast, or autocast in unified mode), int8 (fake-quantised weights)."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    INT8 = "int8"
