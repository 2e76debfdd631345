"""PNG plots of a run (reward and mismatch over steps), from metrics.jsonl records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PLOTS = {
    "reward.png": ("Reward", ["reward/mean", "eval/accuracy"]),
    "mismatch.png": ("Policy mismatch", ["mismatch/abs_logp_diff_mean", "meter/total/ess_token", "meter/total/kl_k3"]),
}


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def write_plots(records: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for fname, (title, keys) in PLOTS.items():
        present = [k for k in keys if _series(records, k)[0]]
        if not present:
            continue
        fig, axes = plt.subplots(len(present), 1, figsize=(7, 2.4 * len(present)), sharex=True, squeeze=False)
        for ax, key in zip(axes[:, 0], present):
            xs, ys = _series(records, key)
            ax.plot(xs, ys, lw=1.5)
            ax.set_ylabel(key, fontsize=8)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("step")
        axes[0, 0].set_title(title)
        fig.tight_layout()
        path = Path(out_dir) / fname
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
