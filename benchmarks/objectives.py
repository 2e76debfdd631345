"""Forward+backward time and autograd memory of every objective preset vs token-mean REINFORCE.

Same random tensors for every preset (B=64, T=1024, float32, ~25% padding). For each preset:
median wall time of loss + backward over repeats, and the bytes of tensors autograd saves for the
backward pass (the memory the objective holds between forward and backward; a CPU proxy for peak
memory, since CPU allocations are not tracked by torch). Printed as ratios to REINFORCE.

    python benchmarks/objectives.py [--B 64] [--T 1024] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tether.objectives import LossInputs, presets


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


def measure(preset, t, repeats: int) -> tuple[float, int]:
    times = []
    for i in range(repeats + 2):
        inp, theta = build(t)
        t0 = time.perf_counter()
        loss, _ = preset(inp)
        loss.backward()
        dt = time.perf_counter() - t0
        if i >= 2:
            times.append(dt)
    saved = 0

    def pack(x):
        nonlocal saved
        saved += x.numel() * x.element_size()
        return x

    inp, theta = build(t)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss, _ = preset(inp)
    loss.backward()
    return statistics.median(times), saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=64)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t = make_inputs(args.B, args.T)
    items = {n: p for n, p in presets().items() if not any(r.endswith("_BTV") for r in p.requires)}
    # presets over the vocabulary (distill_*) need [B, T, V] student and teacher log-probs: not measured here
    for p in items.values():  # warm every code path up before timing anything
        measure(p, t, 1)
    base_time, base_mem = measure(items["reinforce"], t, args.repeats)
    print(f"B={args.B} T={args.T} threads={torch.get_num_threads()} repeats={args.repeats} torch={torch.__version__}")
    print("| preset | fwd+bwd ms | time / REINFORCE | saved MiB | memory / REINFORCE |")
    print("|---|---|---|---|---|")
    worst = 0.0
    for name in sorted(items):
        dt, mem = measure(items[name], t, args.repeats)
        worst = max(worst, dt / base_time)
        print(f"| {name} | {dt * 1e3:.2f} | {dt / base_time:.2f}x | {mem / 2**20:.1f} | {mem / max(base_mem, 1):.2f}x |")
    print(f"worst time ratio: {worst:.2f}x (goal <= 3x)")


if __name__ == "__main__":
    main()
