"""``tether engine-check``: what each installed engine's per-token log-probs are (docs/engines.md)."""

from __future__ import annotations

import argparse
import json

NAME = "engine-check"
HELP = ("Run every installed rollout engine on a small model under one seed and sampling transform, and say "
        "whether its returned log-probs are those of the distribution it sampled from, raw ones or shifted by a "
        "position (docs/engines.md).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="a Hugging Face folder, .gguf file or smollm2 (default: a tiny random Llama built from a config)")
    p.add_argument("--engines", nargs="+", default=None, metavar="NAME",
                   help="probes to run (default: all): torch-builtin torch-lean torch-stock hf-generate-scores "
                        "hf-generate-logits vllm llama-cpp")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts, random models and sampling (default: 0)")
    p.add_argument("--batch", type=int, default=4, help="number of random prompts (default: 4)")
    p.add_argument("--prompt-len", type=int, default=8, help="ids per prompt (default: 8)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens sampled per prompt (default: 16)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default: 0.7)")
    p.add_argument("--top-k", type=int, default=20, help="top-k (default: 20; 0: off)")
    p.add_argument("--top-p", type=float, default=0.9, help="top-p (default: 0.9; 1: off)")
    p.add_argument("--tol", type=float, default=1e-4,
                   help="max abs difference for a candidate to match (default: 1e-4)")
    p.add_argument("--threads", type=int, default=1, help="torch threads during the check (default: 1)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON to FILE")


def config_from_args(args: argparse.Namespace):
    from tether.engine.check import EngineCheckConfig

    return EngineCheckConfig(model=args.model, seed=args.seed, batch=args.batch, prompt_len=args.prompt_len,
                             max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k or None, top_p=None if args.top_p == 1 else args.top_p, tol=args.tol,
                             engines=tuple(args.engines or ()), threads=args.threads)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2g}"


def print_table(cfg, results) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"engine log-probs (T={cfg.temperature}, top-k={cfg.top_k}, top-p={cfg.top_p}, "
                        f"seed {cfg.seed}, tol {cfg.tol:g}, {cfg.threads} thread(s))")
    for col in ("engine", "tether uses", "returns", "|d| sampled", "|d| raw", "|d| closest other", "tokens/s",
                "pass", "note"):
        table.add_column(col)
    for r in results:
        others = {k: v for k, v in r.max_abs_diff.items() if k not in ("sampled", "raw", r.kind)}
        closest = min(others, key=others.get) if others else None
        table.add_row(
            r.engine, "yes" if r.used_by_tether else "no",
            f"{r.kind}: {' = '.join(r.matches)}" if len(r.matches) > 1 else (r.kind or r.status),
            _fmt(r.max_abs_diff.get("sampled")), _fmt(r.max_abs_diff.get("raw")),
            f"{closest} {_fmt(others[closest])}" if closest else "-",
            "-" if r.tokens_per_s is None else f"{r.tokens_per_s:.0f}", "yes" if r.passed else "NO", r.note)
    Console(width=200).print(table)


def run(args: argparse.Namespace) -> int:
    from tether.engine.check import run_engine_check

    cfg = config_from_args(args)  # validated before any model is built
    results = run_engine_check(cfg)
    print_table(cfg, results)
    if args.json:
        from dataclasses import asdict

        with open(args.json, "w") as f:
            json.dump({"config": asdict(cfg), "engines": [r.to_dict() for r in results]}, f, indent=2)
    failed = [r.engine for r in results if not r.passed]
    if failed:
        print(f"engine-check: {', '.join(failed)} (used by tether) did not return the sampled distribution's log-probs")
        return 1
    return 0
