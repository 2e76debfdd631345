"""Multi-turn credit estimators on two environments (issue 14, "Benchmark").

On ``frozenlake`` (text FrozenLake 4x4) and ``calculator`` (the calculator-tool task), the built-in tiny model
is SFT-warm-started on the environment's scripted expert for only a few steps (``ENVS``: chosen so the warm
start succeeds on roughly a third of the held-out episodes) and then trained with GRPO under each turn-level
credit estimator (``--credit``): ``episode``, ``turn``, ``turn_unbiased``, ``gigpo``, for each seed. One run at a
time, each in its own child process (``--one``), torch threads 1; start the command under ``nice -n 5`` on a
shared machine (the children inherit it).

Recorded per run (``RUN.json`` in ``--out``, written when the run ends; a run whose JSON exists is not rerun,
so a stopped benchmark continues where it was):

* held-out greedy success at the warm start and after training (``eval_size`` fixed evaluation seeds);
* the training curve: the success rate of each step's sampled episodes (``agent/success_rate``);
* time per step: wall (``time/step_s``) and CPU time of the process between two consecutive step records
  (``time.process_time``; the first step left out); tokens/s (policy tokens over the RL loop's wall time);
* the run's whole wall time (warm start, both evaluations and the steps) and the load average.

Then per (env, credit): mean and sample sd over seeds, the change against the same seed's ``episode`` run,
and how many runs rose by at least ``GOAL_POINTS``. Writes ``results.json`` and ``table.md`` in ``--out``,
and ``--json`` / ``--plot`` where asked.

    nice -n 5 python benchmarks/agents.py --out DIR [--seeds 0 1 2] [--envs frozenlake calculator]
        [--credits episode turn turn_unbiased gigpo] [--set '{"steps": 20}'] [--table-only]
        [--json docs/benchmarks/agents_credit.json] [--plot docs/img/agents_credit.png]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "benchmarks"):  # tether, and train_runs (when imported from a file, as the test does)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from train_runs import write_report  # noqa: E402

COMMON = dict(objective="grpo", prompts_per_step=8, group_size=8, eval_size=100, threads=1, progress=False,
              drift_every=0)
"""Shared by every run: 8 initial states x 8 episodes per step, 100 held-out evaluation episodes."""
ENVS: dict[str, dict] = {
    "frozenlake": dict(env="frozenlake", warmstart_steps=20, max_new_tokens=4, max_turns=8, steps=40, lr=1e-4),
    "calculator": dict(env="calculator", warmstart_steps=45, max_new_tokens=16, max_turns=4, steps=60, lr=3e-5,
                       temperature=0.5),
}
"""Per environment: the warm start's length (weak on purpose), the action length and turn cap, RL steps, the
learning rate and the sampling temperature. Found on seed 0, episode credit (docs/benchmarks.md): frozenlake's
warm start at 20 steps plays a fixed route, 35 % held-out (50 steps: 60 %); lr 1e-3 collapsed it, 1e-4 and 3e-4
left it flat over 30 steps. calculator's warm start jumps from 0-3 % (40-42 steps: it calls the tool and
miscopies the value) to 62 % (45) and 86 % (50); at temperature 1 its sampled episodes succeed 2 % of the time
(one wrong digit fails), so it samples at 0.5; lr 3e-4 collapsed it in one step, 3e-5 gave 62 -> 74 % in 20."""
CREDITS = ["episode", "turn", "turn_unbiased", "gigpo"]
GOAL_POINTS = 20.0
"""Issue 14's goal: held-out success rises by at least this many points from the warm start."""


def run_name(env: str, credit: str, seed: int) -> str:
    return f"{env}-{credit}-{seed}"


def settings(env: str, credit: str, seed: int, **overrides) -> dict:
    """The flat ``TrainConfig`` fields of one run (``overrides`` last: a smaller run for a test)."""
    return {**COMMON, **ENVS[env], "credit": credit, "seed": seed, **overrides}


@contextlib.contextmanager
def step_clock() -> Iterator[None]:
    """Within the block, every metrics row the run writes also gets ``bench/cpu_s`` and ``bench/wall_s``: process
    CPU time and wall time since the previous row (the first row's: since the block began, evaluation included)."""
    import tether.train.run as run_module

    base = run_module.MetricsLog
    last = [time.process_time(), time.perf_counter()]

    class ClockedLog(base):
        def write(self, record):
            cpu, wall = time.process_time(), time.perf_counter()
            record = {**record, "bench/cpu_s": cpu - last[0], "bench/wall_s": wall - last[1]}
            last[:] = [cpu, wall]
            return super().write(record)

    run_module.MetricsLog = ClockedLog
    try:
        yield
    finally:
        run_module.MetricsLog = base


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def train_one(env: str, credit: str, seed: int, *, out: Path, **overrides) -> dict:
    """Train one (env, credit, seed) run in this process and write its record to ``out/NAME.json``; a record
    that already exists is read back instead (the benchmark resumes)."""
    from tether.train.config import TrainConfig
    from tether.train.sync import train

    name = run_name(env, credit, seed)
    result = out / f"{name}.json"
    if result.exists():
        return json.loads(result.read_text())
    fields = settings(env, credit, seed, **overrides)
    run_dir = out / "runs" / name
    cfg = TrainConfig.from_flat(**fields, out=str(run_dir), overwrite=True, checkpoint_every=fields["steps"])
    load_before, t0 = os.getloadavg(), time.perf_counter()
    with step_clock():
        summary = train(cfg)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    record = {
        "env": env, "credit": credit, "seed": seed, "settings": fields,
        "success_before": summary["eval/accuracy_before"], "success_after": summary["eval/accuracy_after"],
        "curve": [r["agent/success_rate"] for r in rows],
        "turns_curve": [r["agent/turns_mean"] for r in rows],
        "step_wall_s": _median([r["time/step_s"] for r in rows]),
        "step_cpu_s": _median([r["bench/cpu_s"] for r in rows[1:]]),
        "tokens_per_s": summary["perf/tokens_per_s"],
        "rl_wall_s": summary["time/total_s"], "run_wall_s": wall,
        "load_before": load_before, "load_after": os.getloadavg(),
    }
    tmp = result.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(result)  # atomic: a killed run leaves no half-written record
    return record


def run_child(env: str, credit: str, seed: int, out: Path, overrides: dict) -> dict:
    """``train_one`` in a fresh child process (a crash or leak stays in that run); returns its record."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", env, credit, str(seed), "--out", str(out),
           "--set", json.dumps(overrides)]
    p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    result = out / f"{run_name(env, credit, seed)}.json"
    if p.returncode != 0 or not result.exists():
        return {"env": env, "credit": credit, "seed": seed, "error": (p.stdout[-1500:] + p.stderr[-1500:]).strip()}
    return json.loads(result.read_text())


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(results: list[dict]) -> list[dict]:
    """One row per (env, credit): seeds aggregated (module docstring); success in percent."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["env"], r["credit"]), []).append(r)
    episode = {(r["env"], r["seed"]): r["success_after"] for r in results
               if r["credit"] == "episode" and "error" not in r}
    rows = []
    for (env, credit), rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        row: dict = {"env": env, "credit": credit, "runs": len(rs), "failed": len(rs) - len(ok)}
        if not ok:
            rows.append({**row, "error": rs[0]["error"][-300:]})
            continue
        change = [100 * (r["success_after"] - r["success_before"]) for r in ok]
        paired = [100 * (r["success_after"] - episode[env, r["seed"]]) for r in ok if (env, r["seed"]) in episode]
        n_last = max(len(ok[0]["curve"]) // 4, 1)
        for key, xs in (("before", [100 * r["success_before"] for r in ok]),
                        ("after", [100 * r["success_after"] for r in ok]), ("change", change),
                        ("vs_episode", paired),
                        ("train_last_quarter", [100 * statistics.mean(r["curve"][-n_last:]) for r in ok]),
                        ("step_wall_s", [r["step_wall_s"] for r in ok]),
                        ("step_cpu_s", [r["step_cpu_s"] for r in ok if r["step_cpu_s"] is not None]),
                        ("tokens_per_s", [r["tokens_per_s"] for r in ok]),
                        ("run_wall_s", [r["run_wall_s"] for r in ok])):
            if xs:
                row[f"{key}_mean"], row[f"{key}_sd"] = _mean_sd(xs)
        row["goal_met"] = sum(c >= GOAL_POINTS for c in change)
        row["steps"] = len(ok[0]["curve"])
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| env | credit | held-out success before, % | after, % | change, points | vs episode, same seed | "
             f"runs >= +{GOAL_POINTS:.0f} | train success, last quarter, % | step wall, s | step CPU, s | "
             "tokens/s | run wall, s |", "|" + "---|" * 12]

    def ms(r: dict, key: str, spec: str = ".1f", sign: str = "") -> str:
        if f"{key}_mean" not in r:
            return "-"
        return f"{r[f'{key}_mean']:{sign}{spec}} ± {r[f'{key}_sd']:{spec}}"

    for r in rows:
        head = f"| {r['env']} | {r['credit']} |"
        if "error" in r:
            lines.append(f"{head} failed ({r['failed']}/{r['runs']}): {r['error'][-100:]!r} |" + " |" * 10)
            continue
        vs = "-" if r["credit"] == "episode" else ms(r, "vs_episode", sign="+")
        n_ok = r["runs"] - r["failed"]
        lines.append(f"{head} {ms(r, 'before')} | {ms(r, 'after')} | {ms(r, 'change', sign='+')} | {vs} | "
                     f"{r['goal_met']}/{n_ok} | {ms(r, 'train_last_quarter')} | {ms(r, 'step_wall_s', '.2f')} | "
                     f"{ms(r, 'step_cpu_s', '.2f')} | {ms(r, 'tokens_per_s', '.0f')} | {ms(r, 'run_wall_s', '.0f')} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path, window: int = 5) -> None:
    """One panel per environment: each credit's training success (moving mean over ``window`` steps, mean over
    seeds, band = min..max over seeds), the held-out success at the warm start (dashed) and after (markers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    envs = list(dict.fromkeys(r["env"] for r in ok))
    fig, axes = plt.subplots(1, max(len(envs), 1), figsize=(6 * max(len(envs), 1), 4.2), squeeze=False)
    for ax, env in zip(axes[0], envs):
        for j, credit in enumerate(CREDITS):
            rs = [r for r in ok if r["env"] == env and r["credit"] == credit]
            if not rs:
                continue
            n = min(len(r["curve"]) for r in rs)
            smooth = [[100 * statistics.mean(r["curve"][max(0, i - window + 1):i + 1]) for i in range(n)] for r in rs]
            mean = [statistics.mean(col) for col in zip(*smooth)]
            ax.plot(range(1, n + 1), mean, color=f"C{j}", label=f"{credit} (train)")
            ax.fill_between(range(1, n + 1), [min(c) for c in zip(*smooth)], [max(c) for c in zip(*smooth)],
                            color=f"C{j}", alpha=0.12)
            after = [100 * r["success_after"] for r in rs]
            ax.errorbar([n + 1 + 0.4 * j], [statistics.mean(after)], yerr=[_mean_sd(after)[1]], fmt="o",
                        color=f"C{j}", capsize=3)
        before = [100 * r["success_before"] for r in ok if r["env"] == env]
        ax.axhline(statistics.mean(before), color="grey", ls="--", lw=1, label="held-out at warm start (mean)")
        ax.set_title(f"{env}: success over RL steps ({len(before) // max(len(CREDITS), 1) or len(before)} seeds)")
        ax.set_xlabel(f"RL step (train curve: moving mean of {window}); dots: held-out after, mean ± sd")
        ax.set_ylabel("success, %")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="run records and directories (default: a temporary folder)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--envs", nargs="+", default=list(ENVS), choices=list(ENVS))
    ap.add_argument("--credits", nargs="+", default=CREDITS, choices=CREDITS)
    ap.add_argument("--set", default="{}", help='JSON dict of TrainConfig fields over ENVS\' for every run, e.g. '
                    '\'{"steps": 20, "warmstart_steps": 30}\' (tuning; use another --out)')
    ap.add_argument("--table-only", action="store_true", help="run nothing: tabulate the records in --out")
    ap.add_argument("--json", default=None, help="also write the rows and run records here")
    ap.add_argument("--plot", default=None, help="write the success-over-steps plot (PNG) here")
    ap.add_argument("--one", nargs=3, metavar=("ENV", "CREDIT", "SEED"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="tether-agents-"))
    out.mkdir(parents=True, exist_ok=True)
    overrides = json.loads(args.set)
    if not isinstance(overrides, dict):
        ap.error(f"--set must be a JSON dict of TrainConfig fields, got {args.set!r}")
    if args.one:
        env, credit, seed = args.one
        train_one(env, credit, int(seed), out=out, **overrides)
        return
    todo = [(env, credit, seed) for seed in args.seeds for env in args.envs for credit in args.credits]
    results = []
    for env, credit, seed in todo:  # seed-major: a benchmark cut short stays balanced across cells
        result = out / f"{run_name(env, credit, seed)}.json"
        if args.table_only:
            if result.exists():
                results.append(json.loads(result.read_text()))
            continue
        r = run_child(env, credit, seed, out, overrides)
        status = r.get("error", "")[-200:] or (f"{100 * r['success_before']:.0f}% -> {100 * r['success_after']:.0f}%"
                                              f", {r['step_wall_s']:.2f} s/step, run {r['run_wall_s']:.0f} s")
        print(f"{run_name(env, credit, seed)}: {status}  (load {os.getloadavg()[0]:.2f})", flush=True)
        results.append(r)
    rows = summarise(results)
    envs = {e: settings(e, "-", -1, **overrides) for e in args.envs}
    write_report(out, {"envs": envs, "seeds": args.seeds, "rows": rows, "runs": results}, table(rows), args.json)
    if args.plot:
        plot(results, Path(args.plot))
    print(f"runs in {out}\n{table(rows)}")


if __name__ == "__main__":
    main()
