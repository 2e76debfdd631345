"""``metrics.jsonl``: one JSON object per step. On resume, lines past the checkpoint are dropped
(the killed run wrote them after its last checkpoint; the resumed run writes them again).

A run killed while appending leaves a torn last line: the resume drops it with a warning. Any other
line that is not a JSON object with an integer ``step`` is an error naming the file and line;
``check_metrics_file`` raises it before a resumed run builds anything.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


def to_jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _parse(path: Path) -> tuple[list[tuple[str, dict[str, Any]]], int | None]:
    """``([(line, record), ...], torn_line_number)``: the records in order, and the number of an
    unparseable last line (None if the file ends cleanly). Raises ``ValueError`` naming file and line
    for any other bad line."""
    lines = path.read_text(errors="replace").split("\n")
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    out = []
    for k, (i, line) in enumerate(numbered):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if k == len(numbered) - 1:
                return out, i
            raise ValueError(f"{path}:{i}: invalid JSON: {e}") from None
        if not isinstance(record, dict) or type(record.get("step")) is not int:
            raise ValueError(f"{path}:{i}: not a metrics record (a JSON object with an integer 'step')")
        out.append((line, record))
    return out, None


def check_metrics_file(path: str | Path) -> int | None:
    """Validate a run's metrics file before resuming it; returns the last step it records (None: no
    file or no records). Warns about a torn last line (the resume drops it); raises ``ValueError``
    naming file and line for any other bad line."""
    path = Path(path)
    if not path.exists():
        return None
    records, torn = _parse(path)
    if torn is not None:
        log.warning("%s:%d: the last line is torn (the run was killed while writing it); the resume drops it",
                    path, torn)
    return max((r["step"] for _, r in records), default=None)


class MetricsLog:
    def __init__(self, path: str | Path, resume_after_step: int | None = None) -> None:
        self.path = Path(path)
        if resume_after_step is not None and self.path.exists():
            kept = [line for line, r in _parse(self.path)[0] if r["step"] <= resume_after_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        elif resume_after_step is None and self.path.exists():
            self.path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps({k: to_jsonable(v) for k, v in record.items()})
        with open(self.path, "a") as f:
            f.write(line + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    out = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: invalid JSON: {e}") from None
    return out
