"""Trainer overhead: tether's training step against a bare forward + backward + optimiser step.

Runs the real ``tether.train.sync.train`` loop on the built-in tiny model with the rollout phase
replaced by a cycle of ``--rollouts`` fixed rollouts generated once up front by the same engine, so
every step trains on known tokens. Inside that replaced rollout phase, before handing the rollout
to the loop, the benchmark times a *bare step* on the same tokens with a separate copy of the model:

    logits = model(tokens); logp = log_softmax(logits / T).gather(tokens)
    loss = -(logp * advantage * mask).sum() / mask.sum(); loss.backward(); AdamW.step(); zero_grad

(same AdamW settings as tether, fused, no clipping, no metrics). Bare and tether steps therefore
alternate in one process and see the same machine load.

*Tether's trainer step* is the wall time from the end of one rollout phase to the start of the next,
minus the reward scoring (``time/score_s``): pi_old recomputation (with the sampling transform
replayed), advantages, mismatch meter, objective, backward, grad clip, optimiser, scheduler, weight
sync to the engine, metrics line and progress. Overhead = tether / bare - 1 (goal: <= 15 %).

    python benchmarks/trainer_overhead.py [--prompts 16] [--generations 8] [--new-tokens 12] [--steps 14] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def bare_step(model, optimizer, rollout, advantages_B: torch.Tensor) -> None:
    """Plain policy-gradient step over the rollout's completion tokens: the floor any trainer pays."""
    tokens_BT, mask_BT = rollout.tokens_BT, rollout.loss_mask_BT[:, 1:]
    logits_BTV = model(tokens_BT)[:, :-1]
    logp_BT = torch.log_softmax(logits_BTV / rollout.sampling.temperature, -1).gather(
        -1, tokens_BT[:, 1:, None])[..., 0]
    loss = -(logp_BT * advantages_B[:, None] * mask_BT).sum() / mask_BT.sum().clamp(min=1)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=16, help="prompts per step (the default job's)")
    ap.add_argument("--generations", type=int, default=8, help="completions per prompt (the default job's)")
    ap.add_argument("--new-tokens", type=int, default=12, help="max new tokens (the default job's)")
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians")
    ap.add_argument("--rollouts", type=int, default=4, help="distinct fixed rollouts cycled through")
    ap.add_argument("--objective", default="grpo")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from tether.objectives import get_preset
    from tether.objectives.advantages import get_advantage
    from tether.train import setup, sync
    from tether.train.config import TrainConfig
    from tether.train.metrics_log import read_metrics
    from tether.train.scoring import Scorer

    advantage_fn = get_advantage(get_preset(args.objective).advantage)
    state: dict = {"rollouts": [], "bare_s": [], "gaps_s": [], "last_end": None, "i": 0}
    real_build_policy, real_generate = setup.build_policy, setup.generate

    def build_policy(cfg, task):
        policy = real_build_policy(cfg, task)
        state["policy"] = policy
        state["bare_model"] = copy.deepcopy(policy.model)
        params = [p for p in state["bare_model"].parameters() if p.requires_grad]
        state["bare_opt"] = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95),
                                              fused=True)
        return policy

    def generate(policy, examples, cfg, seed):
        t_enter = time.perf_counter()
        if state["last_end"] is not None:
            state["gaps_s"].append(t_enter - state["last_end"])
        if not state["rollouts"]:  # first call: the fixed rollouts, from the real engine
            for k in range(args.rollouts):
                ex = setup.sample_examples(state["task"], cfg, sync.step_seed(cfg.seed, k))
                r = real_generate(policy, ex, cfg, seed=sync.step_seed(cfg.seed, k, 1))
                rewards_B, _ = setup.score(Scorer(state["task"], cfg, {}), policy, r, ex, cfg)  # in-process
                state["rollouts"].append((ex, r, advantage_fn(rewards_B, r.group_B).float()))
        ex, rollout, adv_B = state["rollouts"][state["i"] % args.rollouts]
        state["i"] += 1
        t0 = time.perf_counter()
        bare_step(state["bare_model"], state["bare_opt"], rollout, adv_B)
        state["bare_s"].append(time.perf_counter() - t0)
        examples[:] = ex  # the loop scores the fixed rollout against its own prompts
        state["last_end"] = time.perf_counter()
        return rollout

    real_build_task = setup.build_task

    def build_task(cfg):
        state["task"] = real_build_task(cfg)
        return state["task"]

    setup.build_policy, setup.generate, setup.build_task = build_policy, generate, build_task
    with tempfile.TemporaryDirectory() as d:
        cfg = TrainConfig.from_flat(warmstart_steps=0, steps=args.steps + 1, seed=0, prompts_per_step=args.prompts,
                          group_size=args.generations, max_new_tokens=args.new_tokens, objective=args.objective,
                          eval_size=1, checkpoint_every=10**6, out=d, progress=False, threads=args.threads)
        sync.train(cfg)
        rows = read_metrics(Path(d) / "metrics.jsonl")
    # gap i runs from the end of rollout i to the start of rollout i + 1: step i minus its rollout
    w = args.warmup
    tether_s = [g - r["time/score_s"] for g, r in zip(state["gaps_s"], rows)][w:]
    bare_s = state["bare_s"][w:len(state["gaps_s"])]
    tokens = [int(state["rollouts"][i % args.rollouts][1].attention_mask_BT.sum()) for i in range(len(rows))]
    t_med, b_med = statistics.median(tether_s), statistics.median(bare_s)
    phases = {k: statistics.median(r[k] for r in rows[w:-1]) for k in rows[0] if k.startswith("time/")
              and k not in ("time/rollout_s", "time/score_s", "time/step_s")}
    result = {
        "shape": f"{args.prompts} prompts x {args.generations} generations x <= {args.new_tokens} tokens",
        "threads": args.threads, "steps_timed": len(tether_s), "tokens_per_step": statistics.median(tokens),
        "tether_trainer_step_s": t_med, "bare_step_s": b_med, "overhead": t_med / b_med - 1,
        "tether_phases_s": phases,
    }
    print(json.dumps(result, indent=2))
    print(f"tether trainer step {t_med * 1e3:.1f} ms, bare forward+backward+AdamW {b_med * 1e3:.1f} ms: "
          f"overhead {100 * (t_med / b_med - 1):+.1f} % (goal <= 15 %)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
