"""``RUN_DIR/report.html`` from ``RUN_DIR/metrics.jsonl``: PNG plots next to a static page.

The page needs no server: plots are PNG files in ``RUN_DIR/report/`` referenced by relative paths.
Keys read (defined in docs/metrics.md, section "Keys the report reads"):

    reward.png         reward/mean (smoothed, raw faint behind), eval/accuracy (+ summary.json's before/after),
                       length/mean, entropy/mean
    ess.png            meter/{engine,staleness,drift,total}/{ess_token,ess_seq,ess_geo}
    quantiles.png      meter/{ratio}/logr_{p001,p01,p05,p50,p95,p99,p999} (ratio: total, else engine)
    decomposition.png  meter/decomp/{engine,staleness,total}/var  (cross = total - engine - staleness)
    position.png       meter/{ratio}/by_pos/{lo}-{hi}/abs_logr_mean

The page opens with the result (``headline``): held-out accuracy before -> after with its standard error
(RUN_DIR/summary.json), mean reward in the first vs the last quarter of steps, the config that matters
(RUN_DIR/config.json: task, model, objective, mode, steps, precision) and a one-line mismatch verdict
(``tether.meter.headline.mismatch_verdict``). The mismatch plots shade the float-tolerance floor of the
engine's precision; when the whole run is below it they say so and keep their axes at the floor's scale
instead of autoscaling rounding noise (an fp32 sync run's 1e-14 variance is drawn as what it is: zero).
Steps are integer ticks; axes are labelled in words with units.

A plot whose keys are absent is left out and the page says which key was missing. Values written
as strings by metrics.jsonl ("nan", "inf") are read back as floats; NaN draws a gap.
"""

from __future__ import annotations

import html
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tether.meter.headline import (
    accuracy_sentence,
    correction_sentence,
    decomposition_sentence,
    float_floor,
    mismatch_numbers,
    mismatch_verdict,
    quarter_means,
    reward_sentence,
)

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


LABELS = {
    "reward/mean": "mean reward",
    "eval/accuracy": "held-out accuracy",
    "length/mean": "response length (tokens)",
    "entropy/mean": "entropy (nats/token)",
    "mismatch/abs_logp_diff_mean": "|log pi_old - log mu| (nats/token)",
    "meter/total/ess_token": "token ESS (fraction)",
    "meter/total/kl_k3": "KL(mu || pi_old) (nats/token)",
    "ess_token": "token ESS",
    "ess_seq": "sequence ESS (product of ratios)",
    "ess_geo": "sequence ESS (geometric mean)",
    "meter/total/ess_seq": "sequence ESS (fraction)",
    "meter/total/abs_logr_p99": "|log ratio|, 99th percentile (nats/token)",
    "meter/total/chi2": "chi-square of the token ratios",
    "meter/decomp/engine/var_share": "engine share of the log-ratio variance",
    "meter/decomp/staleness/var_share": "staleness share of the log-ratio variance",
}
"""Axis labels in words with units, by metric key (or by its last part)."""


def label(key: str) -> str:
    """The readable label of ``key`` (the key itself when it has none)."""
    return LABELS.get(key) or LABELS.get(key.rsplit("/", 1)[-1], key)


def smooth(ys: list[float], window: int) -> list[float]:
    """Trailing moving average: ``out[i] = mean(ys[max(0, i - window + 1) : i + 1])``, skipping NaNs (NaN where the
    whole window is NaN)."""
    out = []
    for i in range(len(ys)):
        vals = [v for v in ys[max(0, i - window + 1):i + 1] if not math.isnan(v)]
        out.append(sum(vals) / len(vals) if vals else math.nan)
    return out


def accuracy_points(records, summary: dict[str, Any] | None = None) -> tuple[list[float], list[float]]:
    """Held-out accuracy against updates done, on the axis where step s's reward was measured before update s:
    before training at 0 (``eval/accuracy_before``), ``eval/accuracy`` of step s (after its update) at s + 1, and
    after training (``eval/accuracy_after``) after the last step; a later value at the same x replaces an earlier."""
    summary = summary or {}
    points: dict[float, float] = {}
    before, after = _num(summary.get("eval/accuracy_before")), _num(summary.get("eval/accuracy_after"))
    if before is not None:
        points[0.0] = before
    xs, ys = series(records, "eval/accuracy")
    for x, y in zip(xs, ys):
        points[x + 1] = y
    if after is not None and records:
        points[float(records[-1]["step"]) + 1] = after
    keys = sorted(points)
    return keys, [points[k] for k in keys]


def draw_series(ax, records, key: str, summary: dict[str, Any] | None = None) -> None:
    """One training curve: the reward smoothed (a trailing mean over a tenth of the run) with the raw series faint
    behind it; held-out accuracy as points before, during and after training (``accuracy_points``); else a line."""
    if key == "eval/accuracy":
        ax.plot(*accuracy_points(records, summary), "o-", lw=1.5, ms=4)
        return
    xs, ys = series(records, key)
    if key == "reward/mean" and len(ys) >= 10:
        ax.plot(xs, ys, lw=1, alpha=0.3, color="C0", label="per step")
        ax.plot(xs, smooth(ys, max(2, len(ys) // 10)), lw=1.8, color="C0", label=f"mean of {max(2, len(ys) // 10)}")
        ax.legend(fontsize=7, loc="best")
        return
    ax.plot(xs, ys, lw=1.5)


def _run_mean(records, key: str) -> float | None:
    vals = series(records, key)[1]
    return sum(vals) / len(vals) if vals else None


@dataclass(frozen=True)
class Verdict:
    """The run's mismatch against the float floor of its engine precision."""
    beyond_noise: bool
    text: str
    floor: float
    """Per-token |log r| (nats) of float rounding at this precision."""
    precision: str


def run_verdict(records, precision: str | None) -> Verdict | None:
    """The verdict on the run-mean engine |log r| (``meter/engine/abs_logr_mean``, else the trainer's
    ``mismatch/abs_logp_diff_mean``), total KL and staleness |log r|; None when nothing was measured."""
    engine = _run_mean(records, "meter/engine/abs_logr_mean")
    if engine is None:
        engine = _run_mean(records, "mismatch/abs_logp_diff_mean")
    out = mismatch_verdict(engine, _run_mean(records, "meter/total/kl_k3"), precision,
                           _run_mean(records, "meter/staleness/abs_logr_mean"))
    if out is None:
        return None
    return Verdict(out[0], out[1], float_floor(precision), str(precision or "fp32"))


def step_axis(ax) -> None:
    """Integer step ticks and the step label."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")


def floor_band(ax, lo: float, hi: float, verdict: Verdict | None) -> None:
    """Shade ``[lo, hi]``, the float-tolerance band; when the run is inside it, pin the axis to a few times
    the band (no autoscaled noise) and write the verdict on the plot."""
    ax.axhspan(lo, hi, color="0.6", alpha=0.25, lw=0, label=f"float tolerance ({verdict.precision})")
    if not verdict.beyond_noise:
        span = hi - lo
        ax.set_ylim(lo - 2 * span if lo < 0 else 0.0, hi + 2 * span)
        ax.text(0.5, 0.5, "no mismatch beyond float noise", transform=ax.transAxes, ha="center", va="center",
                fontsize=11, color="0.25", bbox={"facecolor": "white", "alpha": 0.8, "lw": 0})


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


def plot_training(records, path: Path, verdict: Verdict | None = None,
                  summary: dict[str, Any] | None = None) -> str | None:
    keys = [k for k in ("reward/mean", "eval/accuracy", "length/mean", "entropy/mean")
            if _has(records, k) or (k == "eval/accuracy" and len(accuracy_points(records, summary)[0]) > 1)]
    if not keys:
        return "no reward/mean, length/mean or entropy/mean"
    plt = _plt()
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), sharex=True, squeeze=False)
    for ax, k in zip(axes[:, 0], keys):
        draw_series(ax, records, k, summary)
        ax.set_ylabel(label(k), fontsize=8)
        ax.grid(alpha=0.3)
    step_axis(axes[-1, 0])
    axes[0, 0].set_title("Training")
    _save(fig, path)
    return None


def plot_ess(records, path: Path, verdict: Verdict | None = None) -> str | None:
    ratios = [r for r in RATIOS if _has(records, f"meter/{r}/ess_token")]
    if not ratios:
        return "no meter/{ratio}/ess_token"
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(11, 3), sharey=True)
    for ax, level in zip(axes, ("ess_token", "ess_seq", "ess_geo")):
        for r in ratios:
            ax.plot(*series(records, f"meter/{r}/{level}"), lw=1.5, label=r)
        ax.set_title(label(level), fontsize=9)
        step_axis(ax)
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("normalised ESS (1 = no mismatch)")
    if verdict is not None:
        fig.suptitle(verdict.text, fontsize=8)
    axes[0].legend(fontsize=8)
    _save(fig, path)
    return None


def _ratio_with(records, suffix: str) -> str | None:
    for r in ("total", "engine", "staleness", "drift"):
        if _has(records, f"meter/{r}/{suffix}"):
            return r
    return None


def plot_quantiles(records, path: Path, verdict: Verdict | None = None) -> str | None:
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
    if verdict is not None:
        floor_band(ax, -verdict.floor, verdict.floor, verdict)
    ax.set_title(f"log-ratio quantiles ({ratio})")
    step_axis(ax)
    ax.set_ylabel("log r (nats/token)")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    _save(fig, path)
    return None


def plot_decomposition(records, path: Path, verdict: Verdict | None = None) -> str | None:
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
    if verdict is not None:
        floor_band(ax, 0.0, verdict.floor ** 2, verdict)
    ax.set_ylabel("variance of log r (nats^2)")
    ax.set_title("decomposition of log pi_old(current)/mu (gap to the line: 2 Cov)")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    shares = [[_num(r.get(f"meter/decomp/{p}/var_share")) for r in rows] for p in ("engine", "staleness")]
    if verdict is not None and not verdict.beyond_noise:  # shares of rounding noise mean nothing
        ax2.text(0.5, 0.5, "shares not drawn: the variance is float noise", transform=ax2.transAxes,
                 ha="center", va="center", fontsize=10, color="0.25")
        ax2.set_yticks([])
    elif all(v is not None for s in shares for v in s):
        ax2.stackplot(steps, shares[0], shares[1], alpha=0.7)
        ax2.set_ylabel("share of variance")
        ax2.axhline(1.0, color="k", lw=0.6)
    step_axis(ax2)
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


def plot_position(records, path: Path, verdict: Verdict | None = None) -> str | None:
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
    scale = {}
    if verdict is not None and not verdict.beyond_noise:  # the colours span the floor, not the noise
        scale = {"vmin": 0.0, "vmax": verdict.floor}
    im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", origin="lower", interpolation="nearest", cmap="viridis",
                   **scale)
    ax.set_yticks(range(len(buckets)))
    ax.set_yticklabels([k.split("/by_pos/")[1].split("/")[0] for _, k in buckets], fontsize=7)
    ticks = np.linspace(0, len(records) - 1, min(8, len(records))).round().astype(int)
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(records[t]["step"]) for t in ticks], fontsize=7)
    ax.set_xlabel("step")
    ax.set_ylabel("response position")
    ax.set_title(f"mean |log r| by response position ({ratio})"
                 + ("" if verdict is None else f": {verdict.text.split(' (')[0]}"), fontsize=9)
    fig.colorbar(im, ax=ax, label="|log r| (nats/token)")
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


def _read_json(path: Path) -> dict[str, Any]:
    """A run's JSON file (summary.json, config.json) or {} when absent; a broken one is an error naming it."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e.msg} (line {e.lineno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def headline(records, summary: dict[str, Any], config: dict[str, Any]) -> tuple[list[str], Verdict | None]:
    """The result in sentences (accuracy before -> after with its standard error, reward first vs last quarter,
    the config that matters, the mismatch verdict) and the verdict the plots draw."""
    lines = []
    before, after = summary.get("eval/accuracy_before"), summary.get("eval/accuracy_after")
    if before is None:  # no summary.json (a run still going, another framework): the first and last evaluation
        acc = series(records, "eval/accuracy")[1]
        before, after = (acc[0], acc[-1]) if len(acc) > 1 else (None, None)
    acc_text = accuracy_sentence(_num(before), _num(after), summary.get("eval/n"), episodes=bool(config.get("env")))
    if acc_text:
        lines.append(acc_text)
    reward = reward_sentence(*quarter_means(series(records, "reward/mean")[1]))
    if reward:
        lines.append(reward)
    task = f"env {config['env']}" if config.get("env") else config.get("task", summary.get("task"))
    what = [f"{k} {v}" for k, v in (("task", task), ("model", config.get("model")),
                                     ("objective", config.get("objective", summary.get("objective"))),
                                     ("mode", config.get("mode")),
                                     ("steps", len(records)),
                                     ("rollout precision", config.get("rollout_precision"))) if v is not None]
    lines.append(", ".join(what))
    precision = config.get("rollout_precision", summary.get("rollout_precision"))
    verdict = run_verdict(records, precision)
    if verdict is not None:
        lines.append(verdict.text)
    if verdict is not None and verdict.beyond_noise:  # the same sentences as the end-of-run summary
        numbers = mismatch_numbers(records, config.get("old_logits"))
        parts = decomposition_sentence(numbers, precision)
        if parts:
            lines.append(parts)
        lines.append(correction_sentence(numbers, config.get("objective", summary.get("objective"))))
    return lines, verdict


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.html`` and ``run_dir/report/*.png``; returns the HTML path."""
    run_dir = Path(run_dir)
    records = read_records(run_dir / "metrics.jsonl")
    summary = _read_json(run_dir / "summary.json")
    lines, verdict = headline(records, summary, _read_json(run_dir / "config.json"))
    img_dir = run_dir / "report"
    img_dir.mkdir(exist_ok=True)
    sections = []
    for fname, title, fn in PLOTS:
        missing = (plot_training(records, img_dir / fname, verdict, summary) if fn is plot_training
                   else fn(records, img_dir / fname, verdict))
        if missing is None:
            sections.append(f'<h2>{html.escape(title)}</h2>\n<img src="report/{fname}" alt="{html.escape(title)}">')
        else:
            (img_dir / fname).unlink(missing_ok=True)
            sections.append(f"<h2>{html.escape(title)}</h2>\n<p class=missing>Not plotted: {html.escape(missing)}.</p>")
    last = records[-1]
    rows = "".join(
        f"<tr><td>{html.escape(label(k))}</td><td>{_fmt(_num(last.get(k)))}</td><td><code>{html.escape(k)}</code>"
        "</td></tr>" for k in SUMMARY_KEYS if k in last
    )
    head = "".join(f"<p class=headline>{html.escape(line)}</p>\n" for line in lines)
    body = "\n".join(sections)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>tether report: {html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;max-width:1150px;margin:2em auto;padding:0 1em}} img{{max-width:100%}}
table{{border-collapse:collapse}} td{{border:1px solid #ccc;padding:2px 8px}} .missing{{color:#a33}}
.headline{{font-size:1.15em;margin:0.3em 0}} #result{{border-left:4px solid #369;padding:0.2em 1em;margin:1em 0}}</style>
</head>
<body><h1>tether report: {html.escape(run_dir.name)}</h1>
<section id=result>
{head}</section>
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
