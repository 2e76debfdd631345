"""Checkpoint folders for ``tether merge``: read a base and fine-tuned models, check they match, write the merge.

A model folder is what ``tether export`` (and ``save_pretrained``) writes: ``config.json`` plus weights in
``model.safetensors``, sharded ``model-*.safetensors`` with ``model.safetensors.index.json``, or
``pytorch_model.bin`` (read with ``torch.load(weights_only=True)``, which builds tensors only; no code from the
file runs). A tether run directory (``config.json`` of a run + ``checkpoints/``) is first exported to a
temporary folder, as ``tether export`` would.

Before any tensor is read, :func:`check_compatible` compares every model with the base: the architecture
fields of ``config.json`` and every parameter's name and shape (from the safetensors headers), and raises a
``ValueError`` naming the folder and the field or parameter. The merged folder is the base folder's files
(config, generation config, tokenizer) with the merged weights in one ``model.safetensors`` and a
``tether_merge.json`` that records the method, settings and per-model statistics; ``tether train --model
DIR`` and ``AutoModelForCausalLM.from_pretrained(DIR)`` load it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
SKIPPED_FILES = {*INDEX_FILES, "tether_export.json", "tether_merge.json"}
"""Files of the base folder not copied to the merged folder (its weights are new)."""
CONFIG_IGNORED = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash", "use_cache",
                  "bos_token_id", "eos_token_id", "pad_token_id"}
"""``config.json`` keys that may differ between models of one architecture."""


def is_run_dir(path: Path) -> bool:
    """A tether run directory (a run's ``config.json`` and a ``checkpoints/`` folder), not a model folder."""
    return (path / "checkpoints").is_dir() and (path / "config.json").is_file() and not _is_model_config(path)


def _is_model_config(path: Path) -> bool:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(cfg, dict) and "model_type" in cfg


class ModelFolder(Mapping[str, Tensor]):
    """A model folder's weights as a lazy ``{name: tensor}`` mapping (safetensors tensors are read on
    access; ``.bin`` files are loaded whole on first access). ``shapes`` and ``dtypes`` come from the
    headers without reading tensors."""

    def __init__(self, path: str | Path, label: str) -> None:
        self.path, self.label = Path(path), label
        if not self.path.is_dir():
            raise FileNotFoundError(f"{label} {self.path}: no such folder")
        if not (self.path / "config.json").is_file():
            raise ValueError(f"{label} {self.path}: no config.json (not a model folder; a tether run directory "
                             "needs a checkpoints/ folder)")
        try:
            self.config = json.loads((self.path / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{label} {self.path / 'config.json'}: invalid JSON: {e}") from None
        self._files = self._weight_files()
        self._where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self._bin: dict[Path, dict[str, Tensor]] = {}
        for f in self._files:
            for name, shape, dtype in self._header(f):
                if name in self._where:
                    raise ValueError(f"{label} {self.path}: parameter {name!r} is in both {self._where[name].name} "
                                     f"and {f.name}")
                self._where[name], self.shapes[name], self.dtypes[name] = f, shape, dtype

    def _weight_files(self) -> list[Path]:
        for index in INDEX_FILES:
            if (self.path / index).is_file():
                try:
                    weight_map = json.loads((self.path / index).read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{self.label} {self.path / index}: not a weight index ({e})") from None
                files = [self.path / f for f in sorted(set(weight_map.values()))]
                missing = [f.name for f in files if not f.is_file()]
                if missing:
                    raise ValueError(f"{self.label} {self.path}: {index} names missing file {missing[0]}")
                return files
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (self.path / name).is_file():
                return [self.path / name]
        raise ValueError(f"{self.label} {self.path}: no weights (model.safetensors, a sharded index or "
                         "pytorch_model.bin)")

    def _header(self, f: Path) -> Iterator[tuple[str, tuple[int, ...], torch.dtype]]:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(f), framework="pt") as sf:
                    for name in sf.keys():
                        sl = sf.get_slice(name)
                        yield name, tuple(sl.get_shape()), _SAFETENSORS_DTYPES.get(sl.get_dtype(), torch.float32)
            except Exception as e:  # a corrupt header: the safetensors error, with the file named
                raise ValueError(f"{self.label} {f}: cannot read safetensors header: {e}") from None
        else:
            for name, t in self._load_bin(f).items():
                yield name, tuple(t.shape), t.dtype

    def _load_bin(self, f: Path) -> dict[str, Tensor]:
        if f not in self._bin:
            try:
                state = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:
                raise ValueError(f"{self.label} {f}: not a plain tensor checkpoint ({e})") from None
            if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
                raise ValueError(f"{self.label} {f}: expected a dict of tensors")
            self._bin[f] = state
        return self._bin[f]

    def __getitem__(self, name: str) -> Tensor:
        f = self._where[name]
        if f.suffix != ".safetensors":
            return self._load_bin(f)[name]
        from safetensors import safe_open

        with safe_open(str(f), framework="pt") as sf:
            return sf.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def check_compatible(base: ModelFolder, models: list[ModelFolder]) -> None:
    """Raise ``ValueError`` naming the folder and the field / parameter where a model differs from the base:
    a ``config.json`` field both files set (bar :data:`CONFIG_IGNORED`), a parameter name, a shape, or
    floating vs integer dtype."""
    arch = {k: v for k, v in base.config.items() if k not in CONFIG_IGNORED}
    for m in models:
        other = {k: v for k, v in m.config.items() if k not in CONFIG_IGNORED}
        # a key only one file has is a default the other left out (save_pretrained writes them all, tether's
        # tiny-model export only the ones it sets); the shapes below catch any real difference it hides
        for key in sorted(set(arch) & set(other)):
            if arch[key] != other[key]:
                raise ValueError(f"{m.label} {m.path}: config.json field {key!r} is {other[key]!r}, the base "
                                 f"{base.path} has {arch[key]!r} (the models must share one architecture)")
        missing, extra = sorted(set(base.shapes) - set(m.shapes)), sorted(set(m.shapes) - set(base.shapes))
        if missing:
            raise ValueError(f"{m.label} {m.path}: lacks parameter {missing[0]!r} of the base ({len(missing)} missing)")
        if extra:
            raise ValueError(f"{m.label} {m.path}: has parameter {extra[0]!r} the base lacks ({len(extra)} extra)")
        for name, shape in base.shapes.items():
            if m.shapes[name] != shape:
                raise ValueError(f"{m.label} {m.path}: parameter {name!r} has shape {m.shapes[name]}, the base has "
                                 f"{shape}")
            if m.dtypes[name].is_floating_point != base.dtypes[name].is_floating_point:
                raise ValueError(f"{m.label} {m.path}: parameter {name!r} has dtype {m.dtypes[name]}, the base has "
                                 f"{base.dtypes[name]}")


@dataclass
class FloatView(Mapping[str, Tensor]):
    """The floating-point parameters of a folder (the ones with task vectors)."""

    folder: ModelFolder

    def _names(self) -> list[str]:
        return [n for n, d in self.folder.dtypes.items() if d.is_floating_point]

    def __getitem__(self, name: str) -> Tensor:
        if not self.folder.dtypes[name].is_floating_point:
            raise KeyError(name)
        return self.folder[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


def check_integer_tensors_equal(base: ModelFolder, models: list[ModelFolder]) -> dict[str, Tensor]:
    """Integer / bool tensors (buffers) have no task vector: they must be equal in every model; returns the base's."""
    out = {}
    for name, dtype in base.dtypes.items():
        if dtype.is_floating_point:
            continue
        out[name] = base[name]
        for m in models:
            if not torch.equal(m[name], out[name]):
                raise ValueError(f"{m.label} {m.path}: non-floating parameter {name!r} differs from the base's "
                                 "(it cannot be merged)")
    return out


def prepare_out(out: str | Path) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out}: exists and is not an empty folder")
    return out


def write_merged(base: ModelFolder, merged: Mapping[str, Tensor], out: str | Path, record: dict) -> Path:
    """``out`` = the base folder's non-weight files + ``model.safetensors`` (``merged``) + ``tether_merge.json``."""
    from safetensors.torch import save_file

    out = prepare_out(out)
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(base.path.iterdir()):
        if f.is_file() and f.name not in SKIPPED_FILES and not f.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(f, out / f.name)
    state = {k: v.detach().contiguous().clone() for k, v in merged.items()}  # private storage: safetensors refuses shared
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "tether_merge.json").write_text(json.dumps(record, indent=2))
    return out
