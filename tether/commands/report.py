"""``tether report RUN_DIR``: a static HTML page of plots from RUN_DIR/metrics.jsonl."""

from __future__ import annotations

import argparse

NAME = "report"
HELP = "Write RUN_DIR/report.html (reward, ESS, log-ratio quantiles, decomposition, per-position mismatch)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory holding metrics.jsonl")


def run(args: argparse.Namespace) -> int:
    from tether.meter.report import write_report

    out = write_report(args.run_dir)
    print(f"wrote {out} (open it in a browser; plots are in {out.parent / 'report'})")
    return 0
