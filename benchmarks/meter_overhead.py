"""Wall time of one ``tether.meter.measure`` call on realistic shapes, in milliseconds.

The issue's budget is meter overhead <= 5 % of the step time on the default job; this script gives
the numerator (the lead divides by the trainer's measured step time). Inputs are float32 as a
trainer produces them; the meter converts to float64 internally.

Run: python benchmarks/meter_overhead.py [--B 64] [--T 256] [--device cpu|cuda] [--reps 20]

``--train N`` measures the ratio itself on the default job (``tether train`` defaults): N steps with
the meter on and N steps with it off (``setup.mismatch_metrics`` replaced by a no-op), in the same
process, alternating on / off runs ``--rounds`` times so that background load hits both alike. Both
runs sample the same rollouts (same seed; with the default objective the meter does not change the
update). Reports the per-step medians, their difference, and the meter's own clock (``time/meter_s``)
as a share of the step.

Run: python benchmarks/meter_overhead.py --train 8 [--rounds 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tether.meter import measure, to_floats


def make_batch(B: int, T: int, device: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mu = torch.log(torch.rand(B, T, generator=g).clamp(min=1e-6))
    behave = mu + 0.02 * torch.randn(B, T, generator=g)
    old = behave + 0.05 * torch.randn(B, T, generator=g)
    theta = old + 0.01 * torch.randn(B, T, generator=g)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    batch = {"logp_theta_BT": theta, "logp_old_BT": old, "logp_mu_BT": mu, "logp_behave_old_BT": behave,
             "mask_BT": mask, "entropy_BT": torch.rand(B, T, generator=g) * 3}
    return {k: v.to(device) for k, v in batch.items()}


def time_ms(fn, reps: int, device: str) -> list[float]:
    out = []
    for _ in range(reps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def train_overhead(steps: int, rounds: int, threads: int | None) -> None:
    import json
    import tempfile
    from pathlib import Path

    from tether.train import setup
    from tether.train.config import TrainConfig
    from tether.train.sync import train

    real = setup.mismatch_metrics
    step_s: dict[str, list[float]] = {"on": [], "off": []}
    meter_s: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for mode in ("on", "off"):
                setup.mismatch_metrics = real if mode == "on" else (lambda *a, **k: {})
                run = Path(tmp) / f"{mode}{r}"
                try:  # the default job; eval_size only shortens the untimed evaluation around the steps
                    train(TrainConfig.from_flat(steps=steps, eval_size=1, progress=False, threads=threads, out=str(run)))
                finally:
                    setup.mismatch_metrics = real
                rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
                step_s[mode] += [row["time/step_s"] for row in rows[1:]]  # step 0 warms caches
                if mode == "on":
                    meter_s += [row["time/meter_s"] for row in rows[1:]]
    on, off, met = (statistics.median(x) for x in (step_s["on"], step_s["off"], meter_s))
    print(f"default job, {steps} steps x {rounds} rounds per mode (first step of each run dropped), "
          f"threads={torch.get_num_threads()}")
    print("| quantity | median |")
    print("|---|---|")
    print(f"| step time, meter on | {on * 1e3:.1f} ms |")
    print(f"| step time, meter off | {off * 1e3:.1f} ms |")
    print(f"| difference (on - off) / off | {(on - off) / off:+.2%} |")
    print(f"| meter clock time/meter_s | {met * 1e3:.2f} ms |")
    print(f"| meter clock / step time (on) | {sum(meter_s) / sum(step_s['on']):.2%} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=64)
    ap.add_argument("--T", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--train", type=int, default=0, help="N: meter on vs off over N steps of the default job")
    ap.add_argument("--rounds", type=int, default=2, help="with --train: alternating on/off runs per mode")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.train:
        train_overhead(args.train, args.rounds, args.threads)
        return
    batch = make_batch(args.B, args.T, args.device)
    cases = {
        "measure, 4 ratios + profiles": lambda: to_floats(measure(**batch)),
        "measure, 4 ratios, no profiles": lambda: to_floats(measure(**batch, profiles=False)),
        "measure, pi_old/mu only + profiles": lambda: to_floats(
            measure(mask_BT=batch["mask_BT"], logp_old_BT=batch["logp_old_BT"], logp_mu_BT=batch["logp_mu_BT"])),
    }
    print(f"B={args.B} T={args.T} device={args.device} threads={torch.get_num_threads()} reps={args.reps}")
    for name, fn in cases.items():
        fn()  # warm-up
        ts = time_ms(fn, args.reps, args.device)
        print(f"{name:<36} median {statistics.median(ts):8.2f} ms   min {min(ts):8.2f} ms   keys {len(fn())}")


if __name__ == "__main__":
    main()
