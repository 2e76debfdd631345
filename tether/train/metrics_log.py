"""``metrics.jsonl``: one JSON object per step. On resume, lines past the checkpoint are dropped
(the killed run wrote them after its last checkpoint; the resumed run writes them again)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch


def to_jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLog:
    def __init__(self, path: str | Path, resume_after_step: int | None = None) -> None:
        self.path = Path(path)
        if resume_after_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_after_step]
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
