"""ALP's layerwise perturbation: learnable Gaussian noise on every decoder layer's input, training forward only.

Adaptive Layerwise Perturbation (arXiv 2603.19470, methods.md §(a)4; the official Qwen3 patch
``CustomQwen3DecoderLayer.forward``): for every decoder layer ``l`` in ``[start, end)``, before the layer runs
(so before its input layernorm),

    h_l <- h_l + sigma_l * eps_l,   eps_l ~ N(0, I) of h_l's shape,   sigma_l = exp(log_sigma_l)

with one learnable scalar ``log_sigma_l`` per layer (its own learning rate: an optimiser group of its own), or a
fixed buffer. The noise of layer ``l`` in a forward comes from a generator seeded by (run seed, step, forward
index within the step, l), the forward index advancing when the model's input embedding runs: a recomputation of
a layer (gradient checkpointing re-runs the layers in backward, not the embedding) draws exactly the same noise,
and a resumed run draws the same noise as an uninterrupted one.

Only the trainer's model carries the hooks (:meth:`LayerPerturbation.attach`, called after the rollout engine, the
reference model and any other copy were made), so rollouts, evaluation and the KL reference are unperturbed:
the perturbed policy is ALP's numerator, the engine's ``mu`` its denominator (``tether.objectives.alp``). Works on
the built-in model and on Hugging Face decoder models (``model.layers`` of Llama, Qwen, Mistral, ...; PEFT-wrapped
too); the hook reads the hidden state as the layer's first positional argument or its ``hidden_states`` keyword.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

NOISE_SALT = 17
"""Salt of the noise seeds (one stream per (seed, step, forward, layer); no other draw of a run uses it)."""


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of the built-in model or a Hugging Face causal LM (``.model.layers``, or GPT-2's
    ``.transformer.h``); a clear error for a model without them."""
    base = _base(model)
    for owner in ("model", "transformer", None):
        holder = base if owner is None else getattr(base, owner, None)
        for name in ("layers", "h"):
            layers = getattr(holder, name, None) if holder is not None else None
            if isinstance(layers, nn.ModuleList) and len(layers) > 0:
                return layers
    raise ValueError(f"alp: cannot find the decoder layers of {type(base).__name__} (looked for .model.layers, "
                     ".layers and .transformer.h)")


def input_embedding(model: nn.Module) -> nn.Module:
    """The module that embeds the input tokens (runs once per forward, never in a checkpoint recomputation)."""
    base = _base(model)
    if hasattr(base, "get_input_embeddings"):
        return base.get_input_embeddings()
    emb = getattr(getattr(base, "model", None), "embed_tokens", None)
    if emb is None:
        raise ValueError(f"alp: cannot find the input embedding of {type(base).__name__}")
    return emb


def noise_seed(seed: int, step: int, forward: int, layer: int) -> int:
    """The seed of layer ``layer``'s noise in forward ``forward`` of step ``step`` (distinct in range for every
    tuple; 63-bit)."""
    return (((seed * 1_000_003 + step) * 7919 + forward) * 104_729 + layer * 131 + NOISE_SALT) % (2**63 - 1)


def gaussian_noise(shape: torch.Size, seed: int, *, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``N(0, I)`` of ``shape`` from a fresh generator seeded ``seed`` (the same tensor for the same seed)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)


def perturb_hidden(h: Tensor, log_sigma: Tensor, eps: Tensor) -> Tensor:
    """``h + exp(log_sigma) eps``: ALP's perturbation of one layer's input. Gradient: ``d/dh = 1`` and
    ``d/dlog_sigma = sum(exp(log_sigma) eps * g)`` for an upstream gradient ``g``."""
    work = torch.promote_types(h.dtype, torch.float32)  # at least fp32: a bf16 sum would round small noise away
    return (h.to(work) + log_sigma.to(work).exp() * eps.to(work)).to(h.dtype)


class LayerPerturbation(nn.Module):
    """One ``log_sigma`` per perturbed layer (a parameter when ``learnable``, else a buffer) and the hooks that
    apply them (module docstring). Kept apart from the model: its state is not in the model's state dict (the
    engine and the export never see it); the run checkpoints :meth:`state_dict` on its own."""

    def __init__(self, n_layers: int, *, std: float, learnable: bool = True, start: int = 0, end: int | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        end = n_layers if end is None else end
        if not (math.isfinite(std) and std > 0):
            raise ValueError(f"alp: std must be finite and > 0, got {std}")
        if not 0 <= start < end <= n_layers:
            raise ValueError(f"alp: layers [start, end) = [{start}, {end}) must be a non-empty range within the "
                             f"model's {n_layers} layers")
        self.start, self.end, self.seed = start, end, int(seed)
        init = torch.full((end - start,), math.log(std), dtype=torch.float32)
        if learnable:
            self.log_sigma_L = nn.Parameter(init)
        else:
            self.register_buffer("log_sigma_L", init)
        self.step, self.forward_index = 0, -1
        self._handles: list[Any] = []

    @property
    def learnable(self) -> bool:
        return isinstance(self.log_sigma_L, nn.Parameter)

    def sigmas(self) -> Tensor:
        """``sigma_l = exp(log_sigma_l)`` of the perturbed layers, detached."""
        return self.log_sigma_L.detach().exp()

    def begin_step(self, step: int) -> None:
        """Seed the coming forwards by ``step`` (their index restarts at 0)."""
        self.step, self.forward_index = int(step), -1

    def attach(self, model: nn.Module) -> LayerPerturbation:
        """Put the hooks on ``model``'s decoder layers ``[start, end)`` and its input embedding."""
        if self._handles:
            raise RuntimeError("alp: the perturbation is already attached to a model")
        layers = decoder_layers(model)
        if self.end > len(layers):
            raise ValueError(f"alp: layers [{self.start}, {self.end}) but the model has {len(layers)}")
        self.log_sigma_L.data = self.log_sigma_L.data.to(next(model.parameters()).device)
        self._handles.append(input_embedding(model).register_forward_pre_hook(self._next_forward))
        for i in range(self.start, self.end):
            self._handles.append(layers[i].register_forward_pre_hook(self._hook(i), with_kwargs=True))
        return self

    def detach_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _next_forward(self, module: nn.Module, args: tuple) -> None:
        self.forward_index += 1

    def _hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if args:
                h, put = args[0], lambda new: ((new, *args[1:]), kwargs)
            elif "hidden_states" in kwargs:
                h, put = kwargs["hidden_states"], lambda new: (args, {**kwargs, "hidden_states": new})
            else:
                raise ValueError(f"alp: decoder layer {layer} was called without a hidden state")
            seed = noise_seed(self.seed, self.step, max(self.forward_index, 0), layer)
            eps = gaussian_noise(h.shape, seed, dtype=h.dtype, device=h.device)
            return put(perturb_hidden(h, self.log_sigma_L[layer - self.start], eps))
        return hook

    def metrics(self) -> dict[str, float]:
        """``alp/sigma_mean``, ``alp/sigma_min``, ``alp/sigma_max`` and ``alp/sigma_l<i>`` for every perturbed
        layer ``i`` (the sigma trajectories)."""
        s = self.sigmas().cpu()
        out = {"alp/sigma_mean": float(s.mean()), "alp/sigma_min": float(s.min()), "alp/sigma_max": float(s.max())}
        out.update({f"alp/sigma_l{self.start + i}": float(v) for i, v in enumerate(s)})
        return out

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """The optimiser group of the learnable scales (own learning rate, no weight decay); none when fixed."""
        return [{"params": [self.log_sigma_L], "lr": lr, "weight_decay": 0.0}] if self.learnable else []
