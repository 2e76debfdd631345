"""`tether report RUN_DIR`: plots from a realistic synthetic metrics.jsonl, checked in headless Chromium."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch

from tests.processes import run as run_child
from tether.cli import main
from tether.meter import measure, to_floats
from tether.meter.report import read_records, series

pytestmark = pytest.mark.unit


def synthetic_run(run_dir, steps=12, B=16, T=48, decomp=True):
    """metrics.jsonl as the trainer writes it: measure() on batches whose staleness grows over steps."""
    run_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    lines = []
    for step in range(steps):
        mu = torch.log(torch.rand(B, T, generator=g, dtype=torch.float64).clamp(min=1e-4))
        behave = mu + 0.03 * torch.randn(B, T, generator=g, dtype=torch.float64) * (1 + torch.arange(T) / T)
        old = behave + 0.01 * step * torch.randn(B, T, generator=g, dtype=torch.float64)
        lengths = torch.randint(4, T + 1, (B,), generator=g)
        mask = torch.arange(T)[None, :] < lengths[:, None]
        m = to_floats(measure(
            mask_BT=mask, logp_old_BT=old, logp_mu_BT=mu, logp_behave_old_BT=behave if decomp else None,
            entropy_BT=torch.rand(B, T, generator=g, dtype=torch.float64) * 3,
        ))
        m = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in m.items()}
        m.update({"step": step, "reward/mean": 0.2 + 0.05 * step, "length/mean": float(lengths.double().mean()),
                  "entropy/mean": 1.5 - 0.05 * step})
        lines.append(json.dumps(m))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run_dir


def test_report_writes_every_plot(tmp_path, capsys):
    run = synthetic_run(tmp_path / "run")
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    imgs = re.findall(r'<img src="(report/[a-z_]+\.png)"', page)
    assert imgs == ["report/reward.png", "report/ess.png", "report/quantiles.png", "report/decomposition.png",
                    "report/position.png"]
    for src in imgs:
        data = (run / src).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert "Not plotted" not in page


def test_report_says_which_plot_is_missing_and_why(tmp_path):
    run = synthetic_run(tmp_path / "run", steps=4, decomp=False)
    main(["report", str(run)])
    page = (run / "report.html").read_text()
    assert "report/decomposition.png" not in page and not (run / "report/decomposition.png").exists()
    assert "Not plotted: no meter/decomp/*/var (the meter said: parts unknown" in page


def test_read_records_parses_nan_strings_and_reports_bad_lines(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 1, "a": "nan"}\n{"step": 0, "a": 2.0}\n')
    recs = read_records(f)
    xs, ys = series(recs, "a")
    assert xs == [0.0, 1.0] and ys[0] == 2.0 and math.isnan(ys[1])
    f.write_text('{"step": 0}\n{"a": 1}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2: expected a JSON object with a 'step' key"):
        read_records(f)
    assert main(["report", str(tmp_path / "nope")]) == 2


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium, chromium-browser or google-chrome binary on PATH (the report page cannot be rendered)")
def test_report_renders_in_headless_chromium(tmp_path):
    run = synthetic_run(tmp_path / "run", steps=6)
    main(["report", str(run)])
    # a copy of the page that, once loaded, writes each image's decoded width into the DOM
    probe = "<script>addEventListener('load', () => document.body.setAttribute('data-widths', " \
            "[...document.images].map(i => i.naturalWidth).join(',')))</script></body>"
    (run / "probe.html").write_text((run / "report.html").read_text().replace("</body>", probe))
    for page, check_widths in (("report.html", False), ("probe.html", True)):
        dom = run_child(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", (run / page).resolve().as_uri()],
        ).stdout
        assert "mean reward 0.2 in the first quarter of steps" in dom  # the headline is on the rendered page
        srcs = re.findall(r'<img src="([^"]+)"', dom)
        assert len(srcs) == 5, dom[:500]
        for src in srcs:
            assert (run / src).stat().st_size > 0
        if check_widths:
            widths = re.search(r'data-widths="([^"]*)"', dom).group(1).split(",")
            assert len(widths) == 5 and all(int(w) > 100 for w in widths), widths
