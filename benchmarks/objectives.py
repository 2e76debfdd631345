"""Forward+backward time and memory of every objective preset vs token-mean REINFORCE.

Same random tensors for every preset (B=64, T=1024, float32, ~25% padding); REINFORCE is the
``reinforce`` preset itself, measured in the same rounds as every other preset.

Time: every round runs each preset once (loss + backward, metrics included), in a fresh random
order per round, after untimed warm-up rounds; a preset's time is the median over rounds. Running
the presets interleaved means a burst of load on a shared machine hits every preset alike instead
of whichever happened to be measured at that moment. ``--clock wall`` (default) times wall-clock;
``--clock cpu`` times this process's CPU time, which on a loaded machine leaves out the time the
process waits for a core. With several threads every op is a parallel region whose barrier waits
for a descheduled thread, so on a shared machine measure ``--threads 1 --clock cpu``.

Memory, two measures (CPU allocations are not tracked by ``torch.cuda``):

- saved: bytes of the tensors autograd keeps for the backward pass (the memory an objective holds
  between forward and backward), each storage counted once and the caller's own input tensors
  (which exist whatever the objective does) not counted;
- peak: the highest total of bytes allocated and not yet freed during loss + backward, from the
  profiler's allocator events (transient intermediates, metrics and the gradient included).

Besides every preset at its defaults, ``VARIANTS`` measures options that change the computation (the
length-calibrated sequence thresholds of ``tis``, ``mis`` and ``icepop``, meant at ``ref_len = T / 2``), each
as ``preset[option]``.

Printed as ratios to REINFORCE; the goal is every preset <= 3x in time and in both memories.
The goal is judged on the median; the best round ("best", the least disturbed run of each preset)
is printed beside it because on a loaded machine it is the steadier estimate of the work done.

    python benchmarks/objectives.py [--B 64] [--T 1024] [--rounds 30] [--threads N] [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from tether.objectives import LossInputs, presets

GOAL = 3.0


def variants(T: int) -> dict[str, tuple[str, dict]]:
    """Preset options measured as rows of their own: label -> (preset, overrides)."""
    ref = {"ref_len": T / 2}
    return {
        "tis[sequence,sqrt]": ("tis", {"level": "sequence", "length_calibration": "sqrt", **ref}),
        "tis[sequence,geo]": ("tis", {"level": "sequence", "length_calibration": "geo", **ref}),
        "mis[sqrt+drift]": ("mis", {"length_calibration": "sqrt", "length_drift": -0.01, **ref}),
        "mis[geo]": ("mis", {"length_calibration": "geo", **ref}),
        "icepop[sequence]": ("icepop", {"level": "sequence"}),
        "icepop[sequence,sqrt]": ("icepop", {"level": "sequence", "length_calibration": "sqrt", **ref}),
    }


def make_inputs(B: int, T: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logp_old = -torch.rand(B, T, generator=g) * 4
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    adv = torch.randn(B, 1, generator=g).expand(B, T).contiguous() * mask
    return {
        "logp_old_BT": logp_old,
        "logp_theta0_BT": logp_old + 0.05 * torch.randn(B, T, generator=g),
        "logp_mu_BT": logp_old + 0.05 * torch.randn(B, T, generator=g),
        "logp_prox_BT": logp_old + 0.02 * torch.randn(B, T, generator=g),
        "logp_ref_BT": logp_old + 0.1 * torch.randn(B, T, generator=g),
        "logp_expert_old_BT": -torch.rand(B, T, generator=g) * 2,
        "expert_B": torch.arange(B) % 8 == 0,
        "logp_teacher_BT": logp_old - torch.rand(B, T, generator=g),
        "advantages_BT": adv,
        "mask_BT": mask,
    }


def build(t: dict[str, torch.Tensor]) -> tuple[LossInputs, torch.Tensor]:
    theta = t["logp_theta0_BT"].clone().requires_grad_(True)
    inp = LossInputs(
        logp_theta_BT=theta, logp_old_BT=t["logp_old_BT"], advantages_BT=t["advantages_BT"], mask_BT=t["mask_BT"],
        logp_mu_BT=t["logp_mu_BT"], logp_prox_BT=t["logp_prox_BT"], logp_ref_BT=t["logp_ref_BT"],
        expert_B=t["expert_B"], logp_expert_old_BT=t["logp_expert_old_BT"], logp_teacher_BT=t["logp_teacher_BT"],
    )
    return inp, theta


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_once(preset, t, clock=time.perf_counter) -> float:
    inp, _ = build(t)
    t0 = clock()
    loss, _ = preset(inp)
    loss.backward()
    return clock() - t0


def saved_bytes(preset, t) -> int:
    """Bytes autograd saves for backward: distinct storages, the inputs' own storages excluded."""
    inp, theta = build(t)
    inputs = {x.untyped_storage().data_ptr() for x in [theta, *t.values()]}
    seen: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        s = x.untyped_storage()
        if s.data_ptr() not in inputs:
            seen[s.data_ptr()] = s.nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss, _ = preset(inp)
    loss.backward()
    return sum(seen.values())


def peak_bytes(preset, t) -> int:
    """Peak of (allocated - freed) bytes during loss + backward, from the profiler's memory events."""
    inp, _ = build(t)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss, metrics = preset(inp)
        loss.backward()
        del loss, metrics
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=64)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=30, help="timed rounds (each runs every preset once)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0, help="seed of the per-round preset order")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall-clock or process CPU time")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t = make_inputs(args.B, args.T)
    # presets over the vocabulary (distill_*) need [B, T, V] student and teacher log-probs: not measured here
    items = {n: p for n, p in presets().items() if not any(r.endswith("_BTV") for r in p.requires)}
    for label, (name, overrides) in variants(args.T).items():
        items[label] = functools.partial(items[name], **overrides)
    names = sorted(items)
    order = random.Random(args.seed)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.warmup + args.rounds):
        order.shuffle(names)
        for n in names:
            dt = time_once(items[n], t, CLOCKS[args.clock])
            if r >= args.warmup:
                times[n].append(dt)
    names.sort()
    med = {n: statistics.median(v) for n, v in times.items()}
    best = {n: min(v) for n, v in times.items()}
    saved = {n: saved_bytes(items[n], t) for n in names}
    peak = {n: peak_bytes(items[n], t) for n in names}
    b_t, b_b, b_s, b_p = med["reinforce"], best["reinforce"], max(saved["reinforce"], 1), max(peak["reinforce"], 1)
    print(
        f"B={args.B} T={args.T} threads={torch.get_num_threads()} clock={args.clock} rounds={args.rounds} (median) "
        f"torch={torch.__version__}"
    )
    print(
        "| preset | fwd+bwd ms | time / REINFORCE | best ms | best / REINFORCE "
        "| saved MiB | saved / REINFORCE | peak MiB | peak / REINFORCE |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    worst = {"time": 0.0, "saved": 0.0, "peak": 0.0}
    for n in names:
        rt, rs, rp = med[n] / b_t, saved[n] / b_s, peak[n] / b_p
        worst = {"time": max(worst["time"], rt), "saved": max(worst["saved"], rs), "peak": max(worst["peak"], rp)}
        flag = "" if max(rt, rs, rp) <= GOAL else " **>3x**"
        print(
            f"| {n}{flag} | {med[n] * 1e3:.2f} | {rt:.2f}x | {best[n] * 1e3:.2f} | {best[n] / b_b:.2f}x "
            f"| {saved[n] / 2**20:.2f} | {rs:.2f}x "
            f"| {peak[n] / 2**20:.2f} | {rp:.2f}x |"
        )
    print(
        f"worst ratios: time {worst['time']:.2f}x, saved {worst['saved']:.2f}x, peak {worst['peak']:.2f}x "
        f"(goal <= {GOAL:g}x)"
    )


if __name__ == "__main__":
    main()
