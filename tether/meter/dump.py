"""Read per-token log-prob dumps from another framework (TRL, verl, ...) into padded tensors.

One sequence per record: JSONL (one JSON object per line) or Parquet (one row per sequence; needs
pyarrow). Columns, each a list with one entry per token of the sequence:

    logp_mu          required  the engine's (behaviour policy's) log-probs
    logp_old         required  the trainer's recomputed log-probs (pi_old)
    logp_theta       optional  the trainer's log-probs after the update
    logp_behave_old  optional  the trainer's log-probs at the behaviour version (enables the decomposition)
    entropy          optional  per-token entropy in nats (enables the entropy profile)
    mask             optional  0/1 (or true/false) per token; all ones when absent
    version          optional  integer weight version that generated each token

The peers' own tensor names are read as aliases (``ALIASES``): verl's ``rollout_log_probs`` /
``old_log_probs`` / ``response_mask``, TRL's ``sampling_per_token_logps`` / ``old_per_token_logps`` /
``completion_mask``; any other name is mapped with ``columns`` (``tether meter --columns``).

Every error names the file, the line (JSONL, 1-based) or row (Parquet, 0-based) and the column.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

REQUIRED = ("logp_mu", "logp_old")
OPTIONAL_FLOAT = ("logp_theta", "logp_behave_old", "entropy")
OPTIONAL = (*OPTIONAL_FLOAT, "mask", "version")
COLUMNS = (*REQUIRED, *OPTIONAL)
ALIASES: dict[str, tuple[str, ...]] = {
    "logp_mu": ("rollout_log_probs", "sampling_per_token_logps"),
    "logp_old": ("old_log_probs", "old_per_token_logps"),
    "mask": ("response_mask", "completion_mask"),
}
"""tether column -> the names verl and TRL give the same per-token tensor (read when the tether name is absent)."""


@dataclass
class Dump:
    mask_BT: Tensor
    logp_mu_BT: Tensor
    logp_old_BT: Tensor
    logp_theta_BT: Tensor | None = None
    logp_behave_old_BT: Tensor | None = None
    entropy_BT: Tensor | None = None
    version_BT: Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return self.mask_BT.shape[0]


def _records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """``(where, record)`` pairs; ``where`` is 'FILE:LINE' or 'FILE row N'."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow), or convert it to JSONL") from None
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise ValueError(f"{path}: not a readable Parquet file: {e}") from None
        return [(f"{path} row {i}", r) for i, r in enumerate(rows)]
    return jsonl_objects(path, "a JSON object with per-token lists")


def jsonl_objects(path: Path, expected: str) -> list[tuple[str, dict[str, Any]]]:
    """``('FILE:LINE', object)`` for each non-blank line of a JSONL file; an invalid line or one that is not
    a JSON object is an error naming the file, the line and ``expected``."""
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{i}: expected {expected}, got {type(rec).__name__}")
        out.append((f"{path}:{i}", rec))
    return out


def _column(where: str, rec: dict[str, Any], name: str, *, kind: str) -> list[float] | None:
    if name not in rec or rec[name] is None:
        if name in REQUIRED:
            raise ValueError(
                f"{where}: missing column '{name}' (required: {', '.join(REQUIRED)}, or an alias: "
                f"{', '.join(ALIASES[name])}, or --columns {name}=NAME; found: {', '.join(sorted(rec)) or 'none'})"
            )
        return None
    value = rec[name]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: column '{name}' must be a list with one entry per token, got {type(value).__name__}")
    out = []
    for j, v in enumerate(value):
        if isinstance(v, bool):
            if kind == "mask":
                out.append(float(v))
                continue
            raise ValueError(f"{where}: column '{name}' entry {j} must be a number, got a boolean")
        if not isinstance(v, (int, float)):
            raise ValueError(f"{where}: column '{name}' entry {j} must be a number, got {type(v).__name__} {v!r}")
        if kind == "mask" and v not in (0, 1):
            raise ValueError(f"{where}: column 'mask' entry {j} must be 0 or 1, got {v!r}")
        if kind == "version" and (not float(v).is_integer()):
            raise ValueError(f"{where}: column 'version' entry {j} must be an integer, got {v!r}")
        if kind == "float" and math.isnan(float(v)):
            raise ValueError(f"{where}: column '{name}' entry {j} is NaN")
        out.append(float(v))
    return out


def parse_columns(spec: str) -> dict[str, str]:
    """``"logp_mu=my_mu,logp_old=my_old"`` as ``{tether column: file column}``; every key must be a tether column."""
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, source = item.partition("=")
        name, source = name.strip(), source.strip()
        if not sep or not name or not source:
            raise ValueError(f"--columns: expected TETHER=FILE pairs separated by commas, got {item!r}")
        if name not in COLUMNS:
            raise ValueError(f"--columns: unknown tether column {name!r}; valid: {', '.join(COLUMNS)}")
        if name in out:
            raise ValueError(f"--columns: column {name!r} mapped twice")
        out[name] = source
    return out


def _canonical(where: str, rec: dict[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
    """``rec`` with tether column names: an explicit mapping first, then the tether name, then one alias."""
    out = dict(rec)
    for name in COLUMNS:
        if name in columns:
            source = columns[name]
            if source not in rec:
                raise ValueError(f"{where}: missing column '{source}' (mapped to '{name}' by --columns; "
                                 f"found: {', '.join(sorted(rec)) or 'none'})")
            out[name] = rec[source]
            continue
        if name in rec:
            continue
        present = [a for a in ALIASES.get(name, ()) if a in rec]
        if len(present) > 1:
            raise ValueError(f"{where}: columns {' and '.join(repr(a) for a in present)} are both aliases of "
                             f"'{name}'; choose one with --columns {name}=NAME")
        if present:
            out[name] = rec[present[0]]
    return out


def read_dump(path: str | Path, columns: Mapping[str, str] | None = None) -> Dump:
    """Parse and validate a dump into right-padded ``[B, T]`` float64 tensors (module docstring).

    ``columns``: ``{tether column: column in the file}`` for names that are neither tether's nor an alias."""
    path = Path(path)
    records = [(where, _canonical(where, rec, columns or {})) for where, rec in _records(path)]
    if not records:
        raise ValueError(f"{path}: no sequences (the file is empty)")
    cols: dict[str, list[list[float] | None]] = {c: [] for c in (*REQUIRED, *OPTIONAL)}
    for where, rec in records:
        row = {}
        for name in REQUIRED + OPTIONAL_FLOAT:
            row[name] = _column(where, rec, name, kind="float")
        row["mask"] = _column(where, rec, "mask", kind="mask")
        row["version"] = _column(where, rec, "version", kind="version")
        n = len(row["logp_mu"])
        for name, v in row.items():
            if v is not None and len(v) != n:
                raise ValueError(f"{where}: column '{name}' has {len(v)} entries but 'logp_mu' has {n}; every list needs one entry per token")
        for name, v in row.items():
            cols[name].append(v)
    for name in OPTIONAL:
        present = [v is not None for v in cols[name]]
        if any(present) and not all(present):
            first_missing = records[present.index(False)][0]
            raise ValueError(f"{first_missing}: missing column '{name}', which other sequences in the file have")
    B = len(records)
    T = max(len(v) for v in cols["logp_mu"])  # type: ignore[arg-type]

    def pad(name: str, dtype: torch.dtype, fill: float = 0.0) -> Tensor | None:
        if cols[name][0] is None:
            return None
        t = torch.full((B, T), fill, dtype=dtype)
        for b, v in enumerate(cols[name]):
            if v:
                t[b, : len(v)] = torch.tensor(v, dtype=torch.float64).to(dtype)
        return t

    lengths = torch.tensor([len(v) for v in cols["logp_mu"]])  # type: ignore[arg-type]
    valid = torch.arange(T)[None, :] < lengths[:, None]
    mask = pad("mask", torch.float64)
    mask_BT = valid if mask is None else (mask > 0) & valid
    return Dump(
        mask_BT=mask_BT,
        logp_mu_BT=pad("logp_mu", torch.float64),  # type: ignore[arg-type]
        logp_old_BT=pad("logp_old", torch.float64),  # type: ignore[arg-type]
        logp_theta_BT=pad("logp_theta", torch.float64),
        logp_behave_old_BT=pad("logp_behave_old", torch.float64),
        entropy_BT=pad("entropy", torch.float64),
        version_BT=pad("version", torch.long, fill=-1),
    )
