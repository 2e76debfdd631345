"""Mismatch stress: every mismatch source x every correction x seeds, on the default job.

The default ``tether train`` job (built-in tiny model warm-started 400 steps, 1-2 digit addition,
16 prompts x 8, lr 2e-5) for ``--steps`` RL steps per run, one ``tether train`` subprocess per run
(benchmarks/train_runs.py). Sources (``SOURCES``):

    staleness k = 0, 2, 8   --mode async --max-staleness k: the engine generates batch s with
                            version s - k (deterministic lag, staleness policy wait)
    bf16 / int8 rollout     the engine runs bf16 or int8-weight, the trainer fp32
    top-p 0.9, no replay    truncated sampling, the trainer's log-probs on the full softmax
    vLLM rollout            --engine vllm, fp32 (needs .venv-vllm; skipped with a note when absent)
    vLLM bf16 rollout       --engine vllm --rollout-precision bf16: a real engine's bf16 numerics

Methods (``METHODS``): grpo, tis, icepop, p3o, decoupled_ppo, ctpo and the meter's ``auto``. Under
the staleness sources each method gets the old-logit strategy it needs (``old_logits_for``):
decoupled_ppo, p3o and ctpo use ``snapshot`` (``ANCHORED_ON_BEHAVIOUR``); tis, icepop, auto and
grpo ``recompute``.

Reported per (source, method): held-out greedy accuracy after (mean ± sd), its change from
before, its difference from grpo's on the same source and seed (paired), mean token ESS of the total ratio, runs that collapsed (train_runs.COLLAPSE_*: accuracy
ends > 10 points below its start, or last-quarter reward < 0.02), and the meter's mismatch size
(mean |log pi_theta_s / mu| per token). Writes ``results.json`` and ``table.md`` in ``--out`` (and
``--json`` / ``--plot`` where asked). ``--timing`` instead measures sync vs async samples/s, one run
at a time.

    python benchmarks/mismatch_stress.py --steps 40 --seeds 0 1 2 --jobs 2 --out DIR [--reuse] [--table-only]
        [--json docs/benchmarks/mismatch_stress.json] [--plot docs/img/mismatch_stress.png]
    python benchmarks/mismatch_stress.py --timing [--timing-steps 12]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

from train_runs import (  # on sys.path
    ROOT,
    add_run_options,
    fmt,
    mean_of,
    read_run,
    run_all,
    train_command,
    write_report,
)

ASYNC = ["--mode", "async"]
SOURCES: list[tuple[str, list[str]]] = [
    ("staleness k=0", ASYNC + ["--max-staleness", "0"]),
    ("staleness k=2", ASYNC + ["--max-staleness", "2"]),
    ("staleness k=8", ASYNC + ["--max-staleness", "8"]),
    ("bf16 rollout", ["--rollout-precision", "bf16"]),
    ("int8 rollout", ["--rollout-precision", "int8"]),
    ("top-p 0.9, no replay", ["--top-p", "0.9", "--no-replay-truncation"]),
    ("vLLM rollout", ["--engine", "vllm"]),
    ("vLLM bf16 rollout", ["--engine", "vllm", "--rollout-precision", "bf16"]),
]
METHODS = ["grpo", "tis", "icepop", "p3o", "decoupled_ppo", "ctpo", "auto"]
ANCHORED_ON_BEHAVIOUR = {"decoupled_ppo", "p3o", "ctpo"}
"""Methods whose correction is a ratio to ``pi_old`` alone (p3o, ctpo) or that need the exact proximal
anchor (decoupled_ppo): under staleness they need ``pi_old`` = the behaviour version (snapshot). With
recompute their ratio starts at 1 and never sees the staleness. tis, icepop and auto correct with
``pi_old / mu`` and get recompute, so that weight carries the staleness."""
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


def old_logits_for(method: str, flags: list[str]) -> str | None:
    """The old-logit strategy a method gets under an async source (None: a sync source has none)."""
    if "async" not in flags:
        return None
    return "snapshot" if method in ANCHORED_ON_BEHAVIOUR else "recompute"


def matrix(seeds: list[int], only: str | None) -> list[tuple[str, str, list[str], int]]:
    """The runs, seed by seed (every cell gets its first seeds before any gets its last: a matrix cut
    short, or continued with --reuse, stays balanced)."""
    todo = []
    for source, flags in SOURCES:
        if only is not None and only not in source:
            continue
        if "vllm" in flags and not VLLM_PYTHON.exists():
            print(f"note: skipping '{source}': {VLLM_PYTHON.relative_to(ROOT)} does not exist "
                  "(the vLLM engine's environment); run these rows once it is installed")
            continue
        for method in METHODS:
            old = old_logits_for(method, flags)
            extra = ["--objective", method] + (["--old-logits", old] if old is not None else [])
            todo += [(source, method, flags + extra, seed) for seed in seeds]
    return sorted(todo, key=lambda t: seeds.index(t[3]))


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def summarise(results: list[dict]) -> list[dict]:
    """One row per (source, method): the seeds' records aggregated (module docstring)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["source"], r["method"]), []).append(r)
    grpo = {(r["source"], r["seed"]): r["acc_after"] for r in results if r["method"] == "grpo" and "error" not in r}
    rows = []
    for (source, method), rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        paired = [100 * (r["acc_after"] - grpo[source, r["seed"]]) for r in ok if (source, r["seed"]) in grpo]
        row = {"source": source, "method": method, "old_logits": old_logits_for(method, rs[0]["flags"]),
               "runs": len(rs), "failed": len(rs) - len(ok)}
        if ok:
            after = [100 * r["acc_after"] for r in ok]
            delta = [100 * (r["acc_after"] - r["acc_before"]) for r in ok]
            row.update({
                "acc_after_mean": _mean_sd(after)[0], "acc_after_sd": _mean_sd(after)[1],
                "acc_change_mean": _mean_sd(delta)[0], "acc_change_sd": _mean_sd(delta)[1],
                "acc_before": [100 * r["acc_before"] for r in ok],
                "vs_grpo_mean": _mean_sd(paired)[0] if paired else None, "vs_grpo_sd": _mean_sd(paired)[1] if paired else None,
                "ess_token": mean_of(ok, "total_ess_token"), "abs_logr": mean_of(ok, "total_abs_logr"),
                "kl_k3": mean_of(ok, "total_kl_k3"), "collapsed": sum(bool(r["collapsed"]) for r in ok),
                "samples_per_s": mean_of(ok, "samples_per_s"),
            })
        else:
            row["error"] = rs[0]["error"][-300:]
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| source | method | old logits | held-out acc after, % (mean ± sd) | change, points (mean ± sd) | "
             "vs grpo, same seed, points | token ESS | collapsed | mismatch abs log-ratio | mismatch KL (k3) |",
             "|" + "---|" * 10]
    for r in rows:
        head = f"| {r['source']} | {r['method']} | {r['old_logits'] or '-'} |"
        if "error" in r:
            lines.append(f"{head} failed ({r['failed']}/{r['runs']}): {r['error'][-120:]!r} | | | | | | |")
            continue
        failed = f" (+{r['failed']} failed)" if r["failed"] else ""
        vs = "-" if r["vs_grpo_mean"] is None or r["method"] == "grpo" else f"{r['vs_grpo_mean']:+.1f} ± {r['vs_grpo_sd']:.1f}"
        lines.append(f"{head} {r['acc_after_mean']:.1f} ± {r['acc_after_sd']:.1f} | "
                     f"{r['acc_change_mean']:+.1f} ± {r['acc_change_sd']:.1f} | {vs} | {fmt(r['ess_token'], '.4f')} | "
                     f"{r['collapsed']}/{r['runs'] - r['failed']}{failed} | "
                     f"{fmt(r['abs_logr'])} | {fmt(r['kl_k3'])} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Per method, grouped by source, with sd error bars: held-out accuracy after (top) and its change
    from before (bottom: the seeds start at different accuracies, which the top panel's bars include)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    sources = list(dict.fromkeys(r["source"] for r in ok))
    methods = [m for m in METHODS if any(r["method"] == m for r in ok)]
    width = 0.8 / max(len(methods), 1)
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.7 * len(sources)), 7.5), sharex=True)
    for ax, key, label in ((axes[0], "acc_after", "held-out accuracy after, %"),
                           (axes[1], "acc_change", "change from before, points")):
        for j, m in enumerate(methods):
            cells = [(i, r) for i, s in enumerate(sources) for r in ok if r["source"] == s and r["method"] == m]
            ax.bar([i - 0.4 + width * (j + 0.5) for i, _ in cells], [r[f"{key}_mean"] for _, r in cells], width,
                   yerr=[r[f"{key}_sd"] for _, r in cells], capsize=2, label=m, color=f"C{j}")
        ax.set_ylabel(f"{label}\n(mean ± sd over seeds)", fontsize=8)
        ax.axhline(0, color="black", lw=0.6)
    before = [b for r in ok for b in r["acc_before"]]
    if before:
        axes[0].axhline(statistics.mean(before), color="grey", ls="--", lw=1, label="before (mean)")
    axes[1].set_xticks(range(len(sources)), sources, fontsize=8)
    axes[0].set_title("Mismatch stress: each method under each mismatch source (default job)")
    axes[0].legend(fontsize=7, ncol=4)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def timing(steps: int, out: Path) -> None:
    """Sync vs async samples/s: the same short job, one run at a time, 1 torch thread."""
    cases = [("sync", []), ("async k=0", ASYNC + ["--max-staleness", "0"]),
             ("async k=1", ASYNC + ["--max-staleness", "1"]), ("async k=2", ASYNC + ["--max-staleness", "2"])]
    print(f"load before: {os.getloadavg()}")
    for name, flags in cases:
        run = out / f"timing-{name.replace(' ', '_').replace('=', '')}"
        cmd = train_command(flags + ["--eval-size", "50"], 0, steps, run, 1)
        subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, check=True)
        r = read_run(run)
        print(f"{name:10s} {r['samples_per_s']:6.1f} samples/s  {r['step_s']:.3f} s/step  load {os.getloadavg()[0]:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_options(ap, seeds=[0, 1, 2])
    ap.add_argument("--json", default=None, help="also write the per-(source, method) rows and runs here")
    ap.add_argument("--plot", default=None, help="write the accuracy plot (PNG) here")
    ap.add_argument("--timing", action="store_true", help="measure sync vs async samples/s instead")
    ap.add_argument("--timing-steps", type=int, default=12)
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="tether-stress-"))
    out.mkdir(parents=True, exist_ok=True)
    if args.timing:
        timing(args.timing_steps, out)
        return
    results = run_all(matrix(args.seeds, args.only), steps=args.steps, out=out, threads=args.threads,
                      jobs=args.jobs, reuse=args.reuse, table_only=args.table_only)
    rows = summarise(results)
    text = table(rows)
    report = {"steps": args.steps, "seeds": args.seeds, "rows": rows, "runs": results}
    write_report(out, report, text, args.json)
    if args.plot:
        plot(rows, Path(args.plot))
    print(f"steps {args.steps}, seeds {args.seeds}; runs in {out}")
    print(text)


if __name__ == "__main__":
    main()
