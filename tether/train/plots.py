"""PNG plots of a run (reward and mismatch over steps), from metrics.jsonl records.

``reward.png`` opens with the result (held-out accuracy before -> after with its standard error, from the
summary); ``mismatch.png`` with the mismatch verdict, its |log r| and KL panels shading the float-tolerance
floor of the engine's precision (``tether.meter.headline``) and pinned to it when the run is float noise.
Integer step ticks; labels in words with units (``tether.meter.report.label``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tether.meter.headline import accuracy_sentence
from tether.meter.report import (
    accuracy_points,
    draw_series,
    floor_band,
    label,
    run_verdict,
    series,
    step_axis,
)

PLOTS = {
    "reward.png": ("Reward", ["reward/mean", "eval/accuracy"]),
    "mismatch.png": ("Policy mismatch", ["mismatch/abs_logp_diff_mean", "meter/total/ess_token", "meter/total/kl_k3"]),
}
FLOOR_POWER = {"mismatch/abs_logp_diff_mean": 1, "meter/total/kl_k3": 2}
"""Panels with a float-tolerance band: |log r| is at most the floor, the KL at most its square."""


def write_plots(records: list[dict[str, Any]], out_dir: str | Path,
                summary: dict[str, Any] | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summary or {}
    verdict = run_verdict(records, summary.get("rollout_precision"))
    titles = {"reward.png": accuracy_sentence(summary.get("eval/accuracy_before"), summary.get("eval/accuracy_after"),
                                              summary.get("eval/n"),
                                              episodes=str(summary.get("task", "")).startswith("env ")),
              "mismatch.png": verdict.text if verdict else None}
    written = []
    for fname, (title, keys) in PLOTS.items():
        present = [k for k in keys if series(records, k)[0]
                   or (k == "eval/accuracy" and len(accuracy_points(records, summary)[0]) > 1)]
        if not present:
            continue
        fig, axes = plt.subplots(len(present), 1, figsize=(7, 2.4 * len(present) + 0.4), sharex=True, squeeze=False)
        for ax, key in zip(axes[:, 0], present):
            draw_series(ax, records, key, summary)
            if verdict is not None and key in FLOOR_POWER:
                floor_band(ax, 0.0, verdict.floor ** FLOOR_POWER[key], verdict)
            if key.endswith("ess_token"):
                ax.set_ylim(0, 1.05)  # a fraction: 1 - 1e-12 is drawn as 1, not as an axis of its own
            ax.set_ylabel(label(key), fontsize=8)
            ax.grid(alpha=0.3)
        step_axis(axes[-1, 0])
        axes[0, 0].set_title(title)
        if titles[fname]:
            fig.suptitle(titles[fname], fontsize=9)
        fig.tight_layout()
        path = Path(out_dir) / fname
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
