"""The end-of-run summary: summary.json (every number, raw keys), plots, and sentences on the terminal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tether.meter.headline import (
    accuracy_sentence,
    correction_sentence,
    decomposition_sentence,
    duration,
    mismatch_numbers,
    mismatch_verdict,
    reward_sentence,
)
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
        "model": cfg_dict.get("model"),
        "mode": cfg_dict.get("mode"),
        "rollout_precision": cfg_dict.get("rollout_precision"),
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
    for key in ("meter/total/ess_token", "meter/total/kl_k3", "meter/engine/abs_logr_mean",
                "meter/staleness/abs_logr_mean"):
        v = _mean(records, key, slice(None))
        if v is not None:
            summary[f"{key}_mean"] = v
    summary.update(mismatch_numbers(records, cfg_dict.get("old_logits")))  # mismatch/*, correction/* (headline.py)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    plots = write_plots(records, run_dir, summary) if cfg_dict.get("plots", True) else []
    summary["plots"] = [str(p) for p in plots]
    return summary


COUNTER_LABELS = {
    "reward_failed": "reward calls failed",
    "eval_reward_failed": "reward calls failed in evaluation",
    "skipped_steps": "steps skipped",
    "dropped_groups": "groups dropped (all rewards equal)",
    "bad_rows_skipped": "bad dataset rows skipped",
}


def _counter_label(name: str) -> str:
    head, _, tail = name.partition("/")
    label = COUNTER_LABELS.get(head, head.replace("_", " "))
    return f"{label} ({tail})" if tail else label


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The end of a run as sentences: the headline (accuracy before -> after with its standard error), reward
    first vs last quarter, time and throughput, the mismatch verdict, non-zero counters, where the rest is."""
    what = ", ".join(str(summary[k]) for k in ("task", "model", "objective", "mode") if summary.get(k))
    lines = [f"tether train: {what}, {summary['steps']} steps, in {summary['run_dir']}"]
    acc = accuracy_sentence(summary.get("eval/accuracy_before"), summary.get("eval/accuracy_after"),
                            summary.get("eval/n"), episodes=str(summary.get("task", "")).startswith("env "))
    if acc:
        lines.append(acc)
    reward = reward_sentence(summary.get("reward/first_quarter"), summary.get("reward/last_quarter"))
    if reward:
        lines.append(reward)
    took = f"took {duration(summary['time/total_s'])}"
    if summary.get("time/step_s_mean") is not None:
        took += f" ({summary['time/step_s_mean']:.2f} s a step)"
    if summary.get("perf/tokens_per_s") is not None:
        took += f", {summary['perf/tokens_per_s']:,.0f} tokens/s sampled"
    lines.append(took)
    engine = summary.get("meter/engine/abs_logr_mean_mean", summary.get("mismatch/abs_logp_diff_mean"))
    verdict = mismatch_verdict(engine, summary.get("meter/total/kl_k3_mean"), summary.get("rollout_precision"),
                               summary.get("meter/staleness/abs_logr_mean_mean"))
    if verdict:
        lines.append(verdict[1])
    if verdict and verdict[0]:  # a real mismatch: its size and parts, and what the correction did with it
        parts = decomposition_sentence(summary, summary.get("rollout_precision"))
        if parts:
            lines.append(parts)
        lines.append(correction_sentence(summary, summary.get("objective")))
    counts = [f"{v:g} {_counter_label(k[len('count/'):])}" for k, v in summary.items()
              if k.startswith("count/") and isinstance(v, (int, float)) and v]
    if counts:
        lines.append("counters: " + "; ".join(counts))
    plots = ", ".join(Path(p).name for p in summary.get("plots", []))
    lines.append((f"plots {plots}; e" if plots else "e") + "very number is in summary.json; `tether report "
                 f"{summary['run_dir']}` writes the HTML report")
    return lines[:1] + ["  " + line for line in lines[1:]]


def print_summary(summary: dict[str, Any]) -> None:
    print("\n".join(summary_lines(summary)), flush=True)
