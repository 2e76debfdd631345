"""``RUN_DIR/report.html`` from ``RUN_DIR/metrics.jsonl``: PNG plots next to a static page.

The page needs no server: plots are PNG files in ``RUN_DIR/report/`` referenced by relative paths.
Keys read (defined in docs/metrics.md, section "Keys the report reads"):

    reward.png         reward/mean, eval/accuracy, length/mean, entropy/mean
    ess.png            meter/{engine,staleness,drift,total}/{ess_token,ess_seq,ess_geo}
    quantiles.png      meter/{ratio}/logr_{p001,p01,p05,p50,p95,p99,p999} (ratio: total, else engine)
    decomposition.png  meter/decomp/{engine,staleness,total}/var  (cross = total - engine - staleness)
    position.png       meter/{ratio}/by_pos/{lo}-{hi}/abs_logr_mean

A plot whose keys are absent is left out and the page says which key was missing. Values written
as strings by metrics.jsonl ("nan", "inf") are read back as floats; NaN draws a gap.
"""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path
from typing import Any

RATIOS = ("engine", "staleness", "drift", "total")
QUANTILE_BANDS = (("p001", "p999", "p0.1-p99.9"), ("p01", "p99", "p1-p99"), ("p05", "p95", "p5-p95"))
POS_KEY = re.compile(r"^meter/(?P<ratio>\w+)/by_pos/(?P<lo>[0-9.e+-]+)-(?P<hi>[0-9.e+-]+|inf)/abs_logr_mean$")


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl records sorted by step; errors name the file and line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file (tether report reads RUN_DIR/metrics.jsonl)")
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: invalid JSON: {e.msg}") from None
        if not isinstance(rec, dict) or "step" not in rec:
            raise ValueError(f"{path}:{i}: expected a JSON object with a 'step' key")
        out.append(rec)
    if not out:
        raise ValueError(f"{path}: no records")
    return sorted(out, key=lambda r: r["step"])


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v.lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return float(v)
    return None


def series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """``(steps, values)`` of the records holding a numeric ``key``."""
    xs, ys = [], []
    for r in records:
        v = _num(r.get(key))
        if v is not None:
            xs.append(float(r["step"]))
            ys.append(v)
    return xs, ys


def _has(records: list[dict[str, Any]], key: str) -> bool:
    return any(_num(r.get(key)) is not None for r in records)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _plt().close(fig)
    return path


def plot_training(records, path: Path) -> str | None:
    keys = [k for k in ("reward/mean", "eval/accuracy", "length/mean", "entropy/mean") if _has(records, k)]
    if not keys:
        return "no reward/mean, length/mean or entropy/mean"
    plt = _plt()
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), sharex=True, squeeze=False)
    for ax, k in zip(axes[:, 0], keys):
        ax.plot(*series(records, k), lw=1.5)
        ax.set_ylabel(k, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title("Training")
    _save(fig, path)
    return None


def plot_ess(records, path: Path) -> str | None:
    ratios = [r for r in RATIOS if _has(records, f"meter/{r}/ess_token")]
    if not ratios:
        return "no meter/{ratio}/ess_token"
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(11, 3), sharey=True)
    for ax, level in zip(axes, ("ess_token", "ess_seq", "ess_geo")):
        for r in ratios:
            ax.plot(*series(records, f"meter/{r}/{level}"), lw=1.5, label=r)
        ax.set_title(level, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("normalised ESS")
    axes[0].legend(fontsize=8)
    _save(fig, path)
    return None


def _ratio_with(records, suffix: str) -> str | None:
    for r in ("total", "engine", "staleness", "drift"):
        if _has(records, f"meter/{r}/{suffix}"):
            return r
    return None


def plot_quantiles(records, path: Path) -> str | None:
    ratio = _ratio_with(records, "logr_p50")
    if ratio is None:
        return "no meter/{ratio}/logr_p50"
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for (lo, hi, label), alpha in zip(QUANTILE_BANDS, (0.15, 0.3, 0.5)):
        xs, ylo = series(records, f"meter/{ratio}/logr_{lo}")
        xs2, yhi = series(records, f"meter/{ratio}/logr_{hi}")
        if xs and xs == xs2:
            ax.fill_between(xs, ylo, yhi, alpha=alpha, color="tab:blue", lw=0, label=label)
    ax.plot(*series(records, f"meter/{ratio}/logr_p50"), color="tab:blue", lw=1.5, label="median")
    ax.axhline(0.0, color="k", lw=0.6)
    ax.set_title(f"log-ratio quantiles: meter/{ratio}")
    ax.set_xlabel("step")
    ax.set_ylabel("log r")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    _save(fig, path)
    return None


def plot_decomposition(records, path: Path) -> str | None:
    keys = [f"meter/decomp/{p}/var" for p in ("engine", "staleness", "total")]
    if not all(_has(records, k) for k in keys):
        reasons = sorted({str(r["meter/decomp/unavailable"]) for r in records if "meter/decomp/unavailable" in r})
        return "no meter/decomp/*/var" + (f" (the meter said: {reasons[-1]})" if reasons else "")
    steps = [float(r["step"]) for r in records if all(_num(r.get(k)) is not None for k in keys)]
    rows = [r for r in records if all(_num(r.get(k)) is not None for k in keys)]
    eng = [_num(r[keys[0]]) for r in rows]
    sta = [_num(r[keys[1]]) for r in rows]
    tot = [_num(r[keys[2]]) for r in rows]
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 4.6), sharex=True)
    ax.stackplot(steps, eng, sta, labels=["engine Var(e)", "staleness Var(s)"], alpha=0.7)
    ax.plot(steps, tot, color="k", lw=1.3, label="total Var(e+s)")
    ax.set_ylabel("variance of log r")
    ax.set_title("decomposition of log pi_old(current)/mu (gap to the line: 2 Cov)")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    shares = [[_num(r.get(f"meter/decomp/{p}/var_share")) for r in rows] for p in ("engine", "staleness")]
    if all(v is not None for s in shares for v in s):
        ax2.stackplot(steps, shares[0], shares[1], alpha=0.7)
        ax2.set_ylabel("share of variance")
        ax2.axhline(1.0, color="k", lw=0.6)
    ax2.set_xlabel("step")
    ax2.grid(alpha=0.3)
    _save(fig, path)
    return None


def position_buckets(records, ratio: str) -> list[tuple[float, str]]:
    """``(lower edge, key)`` of every by-position bucket of ``ratio`` in the records, sorted."""
    found = {}
    for r in records:
        for k in r:
            m = POS_KEY.match(k)
            if m and m["ratio"] == ratio:
                found[k] = float(m["lo"])
    return sorted((lo, k) for k, lo in found.items())


def plot_position(records, path: Path) -> str | None:
    import numpy as np

    ratio = next((r for r in ("total", "engine", "staleness", "drift") if position_buckets(records, r)), None)
    if ratio is None:
        return "no meter/{ratio}/by_pos/{lo}-{hi}/abs_logr_mean"
    buckets = position_buckets(records, ratio)
    grid = np.full((len(buckets), len(records)), np.nan)
    for j, r in enumerate(records):
        for i, (_, k) in enumerate(buckets):
            v = _num(r.get(k))
            if v is not None:
                grid[i, j] = v
    keep = ~np.all(np.isnan(grid), axis=1)  # buckets no step ever reached (beyond the longest response)
    if not keep.any():
        return f"every meter/{ratio}/by_pos bucket is empty"
    grid, buckets = grid[keep], [b for b, k in zip(buckets, keep) if k]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", origin="lower", interpolation="nearest", cmap="viridis")
    ax.set_yticks(range(len(buckets)))
    ax.set_yticklabels([k.split("/by_pos/")[1].split("/")[0] for _, k in buckets], fontsize=7)
    ticks = np.linspace(0, len(records) - 1, min(8, len(records))).round().astype(int)
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(records[t]["step"]) for t in ticks], fontsize=7)
    ax.set_xlabel("step")
    ax.set_ylabel("response position")
    ax.set_title(f"mean |log r| by position: meter/{ratio}")
    fig.colorbar(im, ax=ax)
    _save(fig, path)
    return None


PLOTS = (
    ("reward.png", "Reward, length and entropy", plot_training),
    ("ess.png", "Effective sample size", plot_ess),
    ("quantiles.png", "Log-ratio quantile bands", plot_quantiles),
    ("decomposition.png", "Engine vs staleness decomposition", plot_decomposition),
    ("position.png", "Mismatch by token position", plot_position),
)

SUMMARY_KEYS = (
    "reward/mean",
    "meter/total/ess_token",
    "meter/total/ess_seq",
    "meter/total/abs_logr_p99",
    "meter/total/kl_k3",
    "meter/total/chi2",
    "meter/decomp/engine/var_share",
    "meter/decomp/staleness/var_share",
)


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.html`` and ``run_dir/report/*.png``; returns the HTML path."""
    run_dir = Path(run_dir)
    records = read_records(run_dir / "metrics.jsonl")
    img_dir = run_dir / "report"
    img_dir.mkdir(exist_ok=True)
    sections = []
    for fname, title, fn in PLOTS:
        missing = fn(records, img_dir / fname)
        if missing is None:
            sections.append(f'<h2>{html.escape(title)}</h2>\n<img src="report/{fname}" alt="{html.escape(title)}">')
        else:
            (img_dir / fname).unlink(missing_ok=True)
            sections.append(f"<h2>{html.escape(title)}</h2>\n<p class=missing>Not plotted: {html.escape(missing)}.</p>")
    last = records[-1]
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{_fmt(_num(last.get(k)))}</td></tr>" for k in SUMMARY_KEYS if k in last
    )
    body = "\n".join(sections)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>tether report: {html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;max-width:1150px;margin:2em auto;padding:0 1em}} img{{max-width:100%}}
table{{border-collapse:collapse}} td{{border:1px solid #ccc;padding:2px 8px}} .missing{{color:#a33}}</style></head>
<body><h1>tether report: {html.escape(run_dir.name)}</h1>
<p>{len(records)} steps ({records[0]['step']} to {last['step']}) from metrics.jsonl. Metric definitions: docs/metrics.md.</p>
<h2>Last step</h2><table>{rows}</table>
{body}
</body></html>
"""
    out = run_dir / "report.html"
    out.write_text(page)
    return out


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if math.isfinite(v) else str(v)
