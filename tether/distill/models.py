"""Teacher and student models for distillation, and the shared-vocabulary check.

The vocabulary check runs first, on configuration alone (the teacher's ``config.json`` or the
built-in configs), so a mismatched teacher fails before any weights are loaded or trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from tether.models.tiny import TinyConfig


def student_config(cfg, vocab_size: int) -> TinyConfig:
    heads = 2 if cfg.student_d_model % 4 else 4
    return TinyConfig(vocab_size=vocab_size, d_model=cfg.student_d_model, n_layers=cfg.student_layers, n_heads=heads,
                      d_ff=4 * cfg.student_d_model // 3 * 2)


def teacher_config(cfg, vocab_size: int) -> TinyConfig:
    heads = 2 if cfg.teacher_d_model % 4 else 4
    return TinyConfig(vocab_size=vocab_size, d_model=cfg.teacher_d_model, n_layers=cfg.teacher_layers, n_heads=heads,
                      d_ff=4 * cfg.teacher_d_model // 3 * 2)


def teacher_vocab_size(cfg, vocab_size: int) -> int:
    """The teacher's output vocabulary size, read from configuration only (no weights loaded)."""
    if cfg.teacher == "builtin":
        return teacher_config(cfg, vocab_size).vocab_size
    path = Path(cfg.teacher) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"config field 'teacher': {cfg.teacher} is neither 'builtin' nor a model directory "
                                "with a config.json")
    data = json.loads(path.read_text())
    if "vocab_size" not in data:
        raise ValueError(f"config field 'teacher': {path} has no vocab_size")
    return int(data["vocab_size"])


def check_shared_vocab(teacher_vocab: int, student_vocab: int) -> None:
    """Token-level distillation compares distributions token by token: the vocabularies must agree."""
    if teacher_vocab != student_vocab:
        raise ValueError(
            f"teacher vocabulary size {teacher_vocab} differs from the student's {student_vocab}: token-level "
            "distillation needs a teacher sharing the student's tokenizer (use algorithm 'blackbox' for a teacher "
            "with another tokenizer)")


def build_student(cfg, task, progress=None):
    from tether.models import builtin
    from tether.models.tokenizer import CharTokenizer

    conf = student_config(cfg, CharTokenizer().vocab_size)
    return builtin.warm_started_tiny(task, seed=cfg.student_seed, steps=cfg.student_warmstart_steps, config=conf,
                                     progress=progress, label="student warm start")


def build_teacher(cfg, task, vocab_size: int, progress=None) -> torch.nn.Module:
    """The frozen teacher: the built-in tiny model with a longer warm start, or a transformers LM."""
    if cfg.teacher == "builtin":
        from tether.models import builtin

        model, _ = builtin.warm_started_tiny(task, seed=cfg.teacher_seed, steps=cfg.teacher_warmstart_steps,
                                             config=teacher_config(cfg, vocab_size), progress=progress,
                                             label="teacher warm start")
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(cfg.teacher)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def vocab_logprobs(model: torch.nn.Module, tokens_BT: Tensor, attention_mask_BT: Tensor, *,
                   temperature: float = 1.0) -> Tensor:
    """``logp_BTV[b, t] = log softmax(logits(tokens[b, <t]) / temperature)``; position 0 is 0.

    Aligned with ``tokens_BT`` like :func:`tether.models.logprobs.token_logprobs`: entry ``t`` is the
    distribution of token ``t`` given the tokens before it.
    """
    from tether.models.logprobs import sequence_logits

    logits_BTV = sequence_logits(model, tokens_BT, attention_mask_BT)[:, :-1]
    lp = torch.log_softmax(logits_BTV.float() / temperature, -1)
    return torch.cat([torch.zeros_like(lp[:, :1]), lp], 1)
