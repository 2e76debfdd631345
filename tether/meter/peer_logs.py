"""The mismatch scalars TRL and verl log themselves, read from their log files to show beside tether's.

Keys kept: TRL ``sampling/*`` (e.g. ``sampling/importance_sampling_ratio/mean``,
``sampling/sampling_logp_difference/max``) and verl ``rollout_corr/*`` (e.g. ``rollout_corr/rollout_is_mean``,
``rollout_corr/kl``). Files read:

    TRL   OUTPUT_DIR/checkpoint-N/trainer_state.json   {"log_history": [{"step": 1, "sampling/...": 0.9}, ...]}
          or any JSONL of flat log dicts
    verl  the file logger (trainer.logger includes 'file'): JSONL rows {"step": 1, "data": {"rollout_corr/...": ...}}

Each key is summarised over the rows that have a number for it: ``mean``, ``last`` and ``n``. Both
frameworks log only such means / minima / maxima per step, which is why tether's per-token report is
worth having beside them. Every error names the file (and the line of a JSONL file).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tether.meter.dump import jsonl_objects

PEER_PREFIXES = ("sampling/", "rollout_corr/")


def _rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".json":
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON: {e.msg} (line {e.lineno})") from None
        history = doc.get("log_history") if isinstance(doc, dict) else None
        if not isinstance(history, list):
            raise ValueError(f"{path}: expected TRL's trainer_state.json with a 'log_history' list")
        return [(f"{path} log_history[{i}]", r) for i, r in enumerate(history) if isinstance(r, dict)]
    rows = jsonl_objects(path, "a JSON object of logged scalars")
    return [(where, row["data"] if isinstance(row.get("data"), dict) else row) for where, row in rows]


def read_peer_log(path: str | Path) -> dict[str, dict[str, float]]:
    """``{key: {"mean", "last", "n"}}`` for every TRL ``sampling/*`` or verl ``rollout_corr/*`` key in the log."""
    path = Path(path)
    values: dict[str, list[float]] = {}
    for _, row in _rows(path):
        for key, v in row.items():
            if key.startswith(PEER_PREFIXES) and isinstance(v, (int, float)) and not isinstance(v, bool):
                if math.isfinite(float(v)):
                    values.setdefault(key, []).append(float(v))
    if not values:
        raise ValueError(f"{path}: no {' or '.join(p + '*' for p in PEER_PREFIXES)} scalars in this log (TRL logs "
                         "sampling/* with vLLM; verl logs rollout_corr/* with algorithm.rollout_correction)")
    return {k: {"mean": sum(v) / len(v), "last": v[-1], "n": float(len(v))} for k, v in sorted(values.items())}
