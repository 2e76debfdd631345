"""A self-teacher whose weights trail the student's: an exponential moving average (EMA).

After every optimiser step the teacher moves towards the student,

    theta_T <- decay * theta_T + (1 - decay) * theta_S

(CaOPD: ``ref_model_mixup_alpha = 1 - decay = 0.01``, synced every step; OPSD ``use_ema_teacher``:
``decay = 0.999``; methods.md §(b)2-3). ``decay = 1`` keeps the initial weights (OPSD's
``fixed_teacher``), ``decay = 0`` copies the current student. The teacher never takes part in the
student's graph: its parameters do not require gradients and the update runs under ``no_grad``.
"""

from __future__ import annotations

import copy

import torch


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A detached copy of ``model`` in eval mode whose parameters never require gradients."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
        p.grad = None
    return teacher


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, *, decay: float) -> None:
    """``theta_T <- decay theta_T + (1 - decay) theta_S`` for every parameter, in place; buffers are copied.

    The two modules must have the same parameter names and shapes (the teacher is a copy of the
    student); a mismatch raises instead of silently pairing the wrong tensors.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"ema_update: decay must be in [0, 1], got {decay}")
    t_params, s_params = dict(teacher.named_parameters()), dict(student.named_parameters())
    if t_params.keys() != s_params.keys():
        raise ValueError("ema_update: teacher and student have different parameters")
    for name, t in t_params.items():
        s = s_params[name]
        if t.shape != s.shape:
            raise ValueError(f"ema_update: parameter {name} has shape {tuple(t.shape)} in the teacher and "
                             f"{tuple(s.shape)} in the student")
        t.lerp_(s.detach().to(t.dtype), 1.0 - decay)
    s_buffers = dict(student.named_buffers())
    for name, b in teacher.named_buffers():
        if name in s_buffers:
            b.copy_(s_buffers[name])
