"""LoRA adapters through PEFT (Hu et al. 2021): ``W x + (alpha / r) B A x`` with ``A`` (r x d_in),
``B`` (d_out x r), ``B`` initialised to zero so training starts from the base model.

:func:`add_lora` injects the adapters *in place* and returns the same ``transformers`` model (not a
``PeftModel`` wrapper), so the loop, the engine copy and the checkpoints see one module tree; only
the adapter weights require gradients. :func:`merge_lora` folds them back into plain linear layers
(used by ``tether export``).
"""

from __future__ import annotations

import torch


def parse_targets(spec: str) -> str | list[str]:
    """``"all-linear"`` (PEFT: every linear layer except the output head) or a comma list of module
    names such as ``"q_proj,v_proj"``."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ValueError("config field 'lora_target_modules' is empty")
    return "all-linear" if names == ["all-linear"] else names


def add_lora(model: torch.nn.Module, *, r: int, alpha: float, target_modules: str, dropout: float = 0.0,
             seed: int = 0) -> torch.nn.Module:
    """Inject LoRA adapters of rank ``r`` into ``model`` (in place) and freeze everything else."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:  # pragma: no cover - peft is in the hf extra
        raise ImportError("LoRA needs the peft package: pip install 'tether[hf]'") from e
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=parse_targets(target_modules),
                        bias="none", task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # A's initialisation
        try:
            model = inject_adapter_in_model(config, model)
        except ValueError as e:
            raise ValueError(f"config field 'lora_target_modules': {e}") from None
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"config field 'lora_target_modules': {target_modules!r} matched no layer")
    return model


def has_lora(model: torch.nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


@torch.no_grad()
def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every LoRA adapter into its base layer and put the plain layer back (in place)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer) and hasattr(module, "get_base_layer"):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    for p in model.parameters():
        p.requires_grad_(True)
    return model
