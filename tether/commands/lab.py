"""``tether lab``: exact bias / variance of objective gradients under controlled mismatch."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

NAME = "lab"
HELP = "Measure every objective's gradient bias and variance against an exact oracle under mismatch."


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--strength must be comma-separated numbers, got '{text}'") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mismatch", default="precision", help="staleness|precision|noise|temperature|truncation|teacher")
    p.add_argument("--strength", type=_floats, default=[0.0, 0.1, 0.3, 1.0], help="comma-separated strengths")
    p.add_argument("--objectives", default=None, help="presets or raw estimators (on_policy, token_is, "
                   "sequence_is, cumulative_is), comma-separated; a preset with overrides is NAME:key=value:key=value "
                   "(e.g. mis:length_calibration=sqrt:ref_len=4); default: grpo,tis,ctpo,gspo,p3o (those "
                   "registered) and the three raw IS estimators")
    p.add_argument("--vocab", type=int, default=4)
    p.add_argument("--horizon", type=int, default=6)
    p.add_argument("--reward", default="pattern", help="pattern|sum")
    p.add_argument("--old", default="mu", choices=["pi", "mu"],
                   help="logp_old = log mu (engine log-probs, default) or log pi (trainer recompute)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=0, help="also run K optimiser steps per objective")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    p.add_argument("--batch", type=int, default=16, help="sequences per Monte Carlo / training batch")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown (docs/lab.md)")
    p.add_argument("--out", type=Path, default=None, help="write results.json and bias.png here")
    p.add_argument("--credit", action="store_true", help="instead: the exact expected gradient of every turn-level "
                   "credit estimator on an enumerable 2-turn MDP (docs/agents-credit.md)")
    p.add_argument("--group-size", type=int, default=3, help="--credit: episodes per GRPO group (2..5)")
    p.add_argument("--credit-baseline", default="std,mean,loo",
                   help="--credit: baselines to compare, comma-separated (std, mean, loo)")


def markdown_table(result: dict) -> str:
    """The results as a Markdown table: objective rows, one bias / variance / cosine cell per strength."""
    rows = result["results"]
    strengths = list(dict.fromkeys(r["strength"] for r in rows))
    names = list(dict.fromkeys(r["objective"] for r in rows))
    head = "| objective | " + " | ".join(f"s={s:g}: bias / var / cos" for s in strengths) + " |\n"
    out = head + "|---" * (len(strengths) + 1) + "|\n"
    for name in names:
        cells = []
        for s in strengths:
            r = next(r for r in rows if r["objective"] == name and r["strength"] == s)
            if "skipped" in r:
                cells.append(f"skipped: {r['skipped']}")
            else:
                mc = "" if r["exact"] else f" (MC ±{r['bias_se']:.3f})"
                cells.append(f"{r['bias']:.4f}{mc} / {r['variance']:.4f} / {r['cosine']:.4f}")
        out += f"| {name} | " + " | ".join(cells) + " |\n"
    return out


def run_credit(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from tether.lab.credit import CreditLabConfig, markdown_table, run_credit_lab

    cfg = CreditLabConfig(group_size=args.group_size,
                          baselines=[b.strip() for b in args.credit_baseline.split(",") if b.strip()])
    result = run_credit_lab(cfg)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "credit.json").write_text(json.dumps(result, indent=1))
    if args.markdown:
        print(markdown_table(result), end="")
        return 0
    table = Table(title=f"turn-level credit, exact expectation over groups of {cfg.group_size} "
                        f"(J={result['J']:.4f}, |grad J|={result['grad_norm']:.4f}; * default)")
    for col in ("estimator", "baseline", "cosine", "scale", "rel. error", "direction error", "variance"):
        table.add_column(col)
    for r in result["results"]:
        table.add_row(r["estimator"], r["baseline"] + ("*" if r["default"] else ""), f"{r['cosine']:.6f}",
                      f"{r['scale']:.4f}", f"{r['rel_error']:.4f}", f"{r['direction_error']:.4f}",
                      f"{r['variance']:.4f}")
    Console().print(table)
    return 0


def run(args: argparse.Namespace) -> int:
    if getattr(args, "credit", False):
        return run_credit(args)
    from rich.console import Console
    from rich.table import Table

    from tether.lab.run import LabConfig, default_objectives, run_lab

    cfg = LabConfig(
        mismatch=args.mismatch, strengths=args.strength,
        objectives=(default_objectives() if args.objectives is None
                    else [o.strip() for o in args.objectives.split(",") if o.strip()]),
        vocab=args.vocab, horizon=args.horizon, reward=args.reward, old=args.old, seed=args.seed,
        steps=args.steps, lr=args.lr, optimizer=args.optimizer, mc_batch=args.batch,
    )
    from tether.train.progress import Reporter

    # progress on stderr-side bar or plain lines; --markdown keeps stdout to the table alone
    result = run_lab(cfg, args.out, Reporter(enabled=not args.markdown))
    if args.markdown:
        print(markdown_table(result), end="")
        return 0
    table = Table(title=f"{cfg.mismatch} mismatch, V={cfg.vocab} T={cfg.horizon}, old={cfg.old}")
    for col in ("objective", "strength", "bias", "variance", "cosine", "note"):
        table.add_column(col)
    for r in result["results"]:
        if "skipped" in r:
            table.add_row(r["objective"], f"{r['strength']:g}", "-", "-", "-", r["skipped"])
            continue
        note = "exact" if r["exact"] else f"MC, bias se {r['bias_se']:.3f}"
        table.add_row(r["objective"], f"{r['strength']:g}", f"{r['bias']:.4f}", f"{r['variance']:.4f}",
                      f"{r['cosine']:.4f}", note)
    console = Console()
    console.print(table)
    for s in result.get("steps", []):
        console.print(f"{s['objective']} s={s['strength']:g}: J {s['J'][0]:.4f} -> {s['J'][-1]:.4f}"
                      f"{'  DIVERGED' if s['diverged'] else ''}")
    console.print(f"{result['seconds']:.1f} s")
    return 0
