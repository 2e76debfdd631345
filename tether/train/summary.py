"""The end-of-run summary: summary.json, plots, and a readable table on the terminal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tether.train.metrics_log import read_metrics
from tether.train.plots import write_plots


def _mean(records: list[dict[str, Any]], key: str, part: slice) -> float | None:
    vals = [r[key] for r in records[part] if isinstance(r.get(key), (int, float))]
    return sum(vals) / len(vals) if vals else None


def write_summary(run_dir: Path, cfg_dict: dict[str, Any], counters: dict[str, Any], accuracy_before: float,
                  accuracy_after: float, tokens_total: int, seconds: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    records = read_metrics(run_dir / "metrics.jsonl")
    n = max(len(records) // 4, 1)
    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "task": f"env {cfg_dict['env']}" if cfg_dict.get("env") else cfg_dict["task"],
        "objective": cfg_dict["objective"],
        "steps": len(records),
        "eval/accuracy_before": accuracy_before,
        "eval/accuracy_after": accuracy_after,
        "reward/first_quarter": _mean(records, "reward/mean", slice(0, n)),
        "reward/last_quarter": _mean(records, "reward/mean", slice(-n, None)),
        "time/total_s": seconds,
        "time/step_s_mean": _mean(records, "time/step_s", slice(None)),
        "perf/tokens_per_s": tokens_total / seconds if seconds > 0 else None,
        "mismatch/abs_logp_diff_mean": _mean(records, "mismatch/abs_logp_diff_mean", slice(None)),
        "mismatch/abs_logp_diff_max": max((r["mismatch/abs_logp_diff_max"] for r in records
                                           if "mismatch/abs_logp_diff_max" in r), default=None),
        **{f"count/{k}": v for k, v in counters.items()},
        **(extra or {}),
    }
    for key in ("meter/total/ess_token", "meter/total/kl_k3"):
        v = _mean(records, key, slice(None))
        if v is not None:
            summary[f"{key}_mean"] = v
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["plots"] = [str(p) for p in write_plots(records, run_dir)]
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    table = Table(title=f"tether train: {summary['task']} / {summary['objective']}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    before, after = summary["eval/accuracy_before"], summary["eval/accuracy_after"]
    table.add_row("held-out accuracy", f"{before:.1%} -> {after:.1%}  ({after - before:+.1%})")
    for key, value in summary.items():
        if key.startswith("eval/") or key in ("task", "objective", "plots") or value is None:
            continue
        table.add_row(key, fmt(value))
    table.add_row("plots", ", ".join(Path(p).name for p in summary.get("plots", [])))
    Console().print(table)
