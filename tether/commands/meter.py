"""``tether meter FILE``: the mismatch summary of a log-prob dump from any framework (docs/meter.md)."""

from __future__ import annotations

import argparse
import json
import math

NAME = "meter"
HELP = "Summarise policy mismatch from a per-token log-prob dump (JSONL or Parquet) made by any framework."

SUMMARY_ROWS = (
    ("n_tokens", "tokens"),
    ("n_seqs", "sequences"),
    ("ess_token", "ESS token"),
    ("ess_seq", "ESS sequence (product)"),
    ("ess_geo", "ESS sequence (geometric)"),
    ("abs_logr_mean", "mean |log r|"),
    ("logr_p001", "log r p0.1"),
    ("logr_p01", "log r p1"),
    ("logr_p50", "log r p50"),
    ("logr_p99", "log r p99"),
    ("logr_p999", "log r p99.9"),
    ("logr_min", "log r min"),
    ("logr_max", "log r max"),
    ("tail_gt_0.1", "frac |log r| > 0.1"),
    ("tail_gt_1", "frac |log r| > 1"),
    ("kl_k1", "KL k1"),
    ("kl_k3", "KL k3"),
    ("chi2", "chi^2"),
    ("ppl_ratio", "perplexity ratio"),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="JSONL (one sequence per line) or .parquet with per-token lists logp_mu, logp_old, ...")
    p.add_argument("--json", action="store_true", help="print every meter metric as one JSON object")
    p.add_argument("--columns", default=None, metavar="TETHER=FILE,...",
                   help="read tether's columns from other names, e.g. logp_mu=vllm_lp,logp_old=actor_lp (verl's and "
                        "TRL's own names, rollout_log_probs / old_log_probs / sampling_per_token_logps / "
                        "old_per_token_logps / response_mask / completion_mask, are read without it)")
    p.add_argument("--peer-log", default=None, metavar="LOG",
                   help="also show the framework's own mismatch scalars from its log: TRL trainer_state.json or "
                        "JSONL (sampling/*), verl's file logger JSONL (rollout_corr/*)")
    p.add_argument("--current-version", type=int, default=None,
                   help="the trainer's version when logp_old was computed (default: the largest 'version' in the file)")


def summarise(path: str, current_version: int | None = None, columns: str | None = None) -> dict:
    from tether.meter.auto import choose_correction
    from tether.meter.dump import parse_columns, read_dump
    from tether.meter.measure import measure, to_floats

    d = read_dump(path, parse_columns(columns) if columns else None)
    if d.version_BT is not None:
        newest = int(d.version_BT[d.mask_BT].max()) if d.mask_BT.any() else 0
        if current_version is None:
            current_version = newest
        elif current_version < newest:
            raise ValueError(f"{path}: --current-version {current_version} is older than the newest token version {newest} in the file")
    metrics = to_floats(measure(
        mask_BT=d.mask_BT, logp_theta_BT=d.logp_theta_BT, logp_old_BT=d.logp_old_BT, logp_mu_BT=d.logp_mu_BT,
        logp_behave_old_BT=d.logp_behave_old_BT, entropy_BT=d.entropy_BT, version_BT=d.version_BT,
        current_version=current_version if d.version_BT is not None else None,
    ))
    decision = choose_correction(metrics, ratio="total")
    metrics["meter/auto/level"] = decision.level.value
    metrics["meter/auto/threshold"] = decision.threshold
    metrics["meter/auto/reason"] = decision.reason
    return metrics


def _print_table(path: str, m: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from tether.meter.measure import RATIO_NAMES

    ratios = [r for r in RATIO_NAMES if f"meter/{r}/n_tokens" in m]
    table = Table(title=f"policy mismatch: {path}")
    table.add_column("statistic")
    for r in ratios:
        table.add_column(r, justify="right")
    for key, label in SUMMARY_ROWS:
        table.add_row(label, *(f"{m[f'meter/{r}/{key}']:.6g}" for r in ratios))
    console = Console()
    console.print(table)
    if "meter/decomp/unavailable" in m:
        console.print(f"decomposition unavailable: {m['meter/decomp/unavailable']}")
    else:
        dec = Table(title="decomposition of log pi_old(current)/mu")
        for c in ("part", "variance", "share of variance", "KL k1", "share of k1"):
            dec.add_column(c, justify="right")
        for part in ("engine", "staleness"):
            p = f"meter/decomp/{part}"
            dec.add_row(part, f"{m[p + '/var']:.6g}", f"{m[p + '/var_share']:.3f}", f"{m[p + '/kl_k1']:.6g}",
                        f"{m[p + '/kl_k1_share']:.3f}")
        dec.add_row("cross (2 cov)", f"{m['meter/decomp/cross/var']:.6g}", f"{m['meter/decomp/cross/var_share']:.3f}", "", "")
        dec.add_row("total", f"{m['meter/decomp/total/var']:.6g}", "1", f"{m['meter/decomp/total/kl_k1']:.6g}", "1")
        console.print(dec)
    console.print(f"suggested correction (auto): {m['meter/auto/level']}, threshold {m['meter/auto/threshold']:.4g}")
    console.print(f"  because {m['meter/auto/reason']}")


def _print_peer(path: str, peer: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"the framework's own mismatch log: {path}")
    for c in ("key", "mean over steps", "last", "steps"):
        table.add_column(c, justify="right" if c != "key" else "left")
    for key, v in peer.items():
        table.add_row(key, f"{v['mean']:.6g}", f"{v['last']:.6g}", f"{int(v['n'])}")
    Console().print(table)


def run(args: argparse.Namespace) -> int:
    metrics = summarise(args.file, args.current_version, args.columns)
    peer = None
    if args.peer_log:
        from tether.meter.peer_logs import read_peer_log

        peer = read_peer_log(args.peer_log)
        metrics.update({f"peer/{k}/{s}": v[s] for k, v in peer.items() for s in ("mean", "last", "n")})
    if args.json:
        # non-finite values as strings, as in metrics.jsonl (empty profile buckets are NaN)
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in metrics.items()}
        print(json.dumps(clean, indent=1, sort_keys=True))
    else:
        _print_table(args.file, metrics)
        if peer is not None:
            _print_peer(args.peer_log, peer)
    return 0
