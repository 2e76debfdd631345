"""Reduced-precision rollouts: the numerics source of policy mismatch, produced on purpose.

Two ways to run the rollout engine below the trainer's fp32 (methods.md §5 (c)1, Jet-RL):

* **split** (the common production set-up): the engine runs in ``bf16`` / ``fp16`` (weights and
  activations cast) or with ``int8`` weights (per-output-channel symmetric fake quantisation,
  activations fp32) while the trainer stays fp32. ``mu`` then differs from ``pi_old`` even at the
  same weight version: the meter's ``engine`` ratio shows it.
* **unified** (Jet-RL's alternative): both sides run the *same* reduced-precision forward. The
  engine keeps fp32 master weights and runs under ``torch.autocast`` (bf16 / fp16) or with the
  int8-fake-quantised weights; the trainer's forward is wrapped the same way (autocast, or the
  quantised weights with a straight-through gradient ``Q(w) + (w - sg(w))`` so the fp32 master
  weights are what the optimiser updates). The remaining gap is only KV-cache vs full-sequence
  rounding.

int8 weight quantisation of a matrix ``W`` (rows = output channels), applied to every 2-D weight
of the model's linear layers and to the (tied) embedding / output head:

    s_r = max_c |W_rc| / 127,   Q(W)_rc = s_r * clamp(round(W_rc / s_r), -127, 127)   (s_r = 0 -> 0)
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from tether.engine.kinds import RolloutPrecision as Precision
from tether.engine.torch_engine import TorchEngine

_AUTOCAST = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}


def fake_quant_int8(w: Tensor) -> Tensor:
    """Per-row symmetric int8 quantise-dequantise of a 2-D weight (module docstring), same dtype."""
    if w.dim() != 2:
        raise ValueError(f"fake_quant_int8: expects a 2-D weight, got shape {tuple(w.shape)}")
    scale = w.detach().abs().amax(dim=1, keepdim=True) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(w.detach() / safe), -127, 127)
    return torch.where(scale > 0, q * safe, torch.zeros_like(w))


def quantised_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters int8 mode quantises: every 2-D parameter (linear layers, embedding)."""
    return [n for n, p in model.named_parameters() if p.dim() == 2]


@torch.no_grad()
def quantise_weights_(model: torch.nn.Module) -> None:
    """Replace every 2-D parameter by its int8 fake quantisation, in place (views stay views)."""
    for name in quantised_names(model):
        p = model.get_parameter(name)
        p.copy_(fake_quant_int8(p))


def autocast(precision: Precision):
    """``torch.autocast`` on the parameters' device type for bf16 / fp16; a no-op otherwise."""
    dtype = _AUTOCAST.get(Precision(precision))
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=dtype)


class PrecisionEngine(TorchEngine):
    """A :class:`TorchEngine` whose forward runs at ``precision``; ``unified`` picks the Jet-RL form.

    split bf16/fp16: the model is cast (``TorchEngine(dtype=...)``); split or unified int8: weights
    are fake-quantised after every :meth:`load_weights`; unified bf16/fp16: fp32 weights, every
    :meth:`generate` runs under autocast (entered in the calling thread: autocast is thread-local).
    """

    def __init__(self, model: torch.nn.Module, *, precision: Precision, unified: bool, eos_id: int,
                 pad_id: int | None = None, **kwargs) -> None:
        self.precision = Precision(precision)
        self.unified = bool(unified)
        dtype = None if self.unified else {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}.get(
            self.precision)
        super().__init__(model, eos_id=eos_id, pad_id=pad_id, dtype=dtype, **kwargs)
        if self.precision is Precision.INT8:
            quantise_weights_(self.model)

    def load_weights(self, state_dict: Mapping[str, Tensor], version: int) -> None:
        super().load_weights(state_dict, version)
        if self.precision is Precision.INT8:
            quantise_weights_(self.model)

    def generate(self, prompts: Sequence[Sequence[int]], params, *, seed: int, group_B=None, n: int = 1):
        with autocast(self.precision) if self.unified else contextlib.nullcontext():
            return super().generate(prompts, params, seed=seed, group_B=group_B, n=n)


class _PrecisionForward:
    """Instance ``forward`` of a trainer model under unified precision.

    A callable object (not a closure) so ``copy.deepcopy`` of the model re-points it at the copy.
    bf16 / fp16: the class forward under autocast. int8: ``torch.func.functional_call`` with every
    2-D parameter replaced by ``Q(w) + (w - sg(w))``: forward value exactly ``Q(w)`` (so it equals
    the engine's quantised weights bit for bit), gradient the straight-through identity.
    """

    def __init__(self, module: torch.nn.Module, precision: Precision) -> None:
        self.module = module
        self.precision = Precision(precision)

    def __call__(self, *args, **kwargs):
        m = self.module
        plain = type(m).forward.__get__(m)
        if self.precision is not Precision.INT8:
            with autocast(self.precision):
                return plain(*args, **kwargs)
        params = {}
        for name, p in m.named_parameters():
            params[name] = fake_quant_int8(p) + (p - p.detach()) if p.dim() == 2 else p
        del m.forward  # functional_call calls module(...): let it reach the class forward once
        try:
            return torch.func.functional_call(m, params, args, kwargs)
        finally:
            m.forward = self


def install_train_precision(model: torch.nn.Module, precision: Precision) -> torch.nn.Module:
    """Make every forward of the trainer ``model`` run at ``precision`` (unified mode); returns it.

    The state dict, parameter names and optimiser view are unchanged (master weights stay fp32).
    """
    if Precision(precision) is not Precision.FP32:
        model.forward = _PrecisionForward(model, precision)
    return model
