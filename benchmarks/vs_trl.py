"""tether vs TRL ``GRPOTrainer``: seconds per RL step on the same tiny model, task and shapes.

Both sides, in one process (same allocator, same torch threads, fp32):
- the built-in tiny model (random init, seed 0) exported once with ``save_hf``; TRL loads that folder,
  tether starts from the same weights;
- arithmetic prompts, ``--prompts`` prompts x ``--generations`` completions per step, at most
  ``--new-tokens`` new tokens, temperature 1, exact-match reward;
- one optimiser step per RL step (TRL: ``per_device_train_batch_size`` = prompts x generations,
  ``num_iterations=1``, ``steps_per_generation=1``; tether: epochs 1, minibatches 1), AdamW lr 1e-5,
  PPO-clip eps 0.2, no KL, no reference model.
TRL runs in its best CPU setting: ``use_cpu=True``, ``bf16=False``, ``gradient_checkpointing=False``.
The first ``--warmup`` steps of each run are excluded from its mean; ``--rounds`` rounds alternate
one tether run and one TRL run, and the medians over rounds are reported (with every round's pair).

    python benchmarks/vs_trl.py [--steps 12] [--prompts 2] [--generations 4] [--new-tokens 32] [--threads 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from trl_timing import step_timer  # benchmarks/ is on sys.path when the script runs


def run_trl(model_dir: Path, prompts: list[str], args) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from tether.tasks.registry import get_task

    task = get_task("arithmetic")
    answers = {p: a for p, a in prompts}

    def reward(prompts, completions, **_):
        return [task.reward(p, c, answers[p]) for p, c in zip(prompts, completions)]

    n_rows = args.prompts * (args.steps + 2)
    ds = Dataset.from_dict({"prompt": [p for p, _ in prompts][:n_rows]})
    timer = step_timer()
    cfg = GRPOConfig(
        output_dir=str(model_dir / "trl_out"), use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        per_device_train_batch_size=args.prompts * args.generations, num_generations=args.generations,
        max_completion_length=args.new_tokens, max_steps=args.steps, learning_rate=1e-5, beta=0.0,
        temperature=1.0, num_iterations=1, steps_per_generation=1, epsilon=0.2, logging_steps=1000,
        save_strategy="no", report_to="none", shuffle_dataset=False, seed=0, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=reward, args=cfg, train_dataset=ds,
                          processing_class=tok, callbacks=[timer])
    trainer.train()
    return {"step_times": timer.times}


def run_tether(model_dir: Path, args) -> dict:
    from tether.train.config import TrainConfig
    from tether.train.metrics_log import read_metrics
    from tether.train.sync import train

    out = model_dir / "tether_out"
    cfg = TrainConfig.from_flat(
        model="tiny", warmstart_steps=0, steps=args.steps, seed=0, prompts_per_step=args.prompts,
        group_size=args.generations, max_new_tokens=args.new_tokens, temperature=1.0, lr=1e-5, epochs=1,
        minibatches=1, objective="grpo", eval_size=1, checkpoint_every=10**6, out=str(out), progress=False,
        threads=args.threads,
    )
    train(cfg)
    rows = read_metrics(out / "metrics.jsonl")
    return {"step_times": [r["time/step_s"] for r in rows], "tokens": [r["length/mean"] * args.prompts * args.generations for r in rows],
            "phases": {k: statistics.mean(r[k] for r in rows[args.warmup:]) for k in rows[-1] if k.startswith("time/")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="alternating tether / TRL runs; medians are reported")
    ap.add_argument("--json", type=str, default=None, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import random

    from tether.models.builtin import tiny_model
    from tether.models.tiny import save_hf
    from tether.tasks.registry import get_task

    task = get_task("arithmetic")
    rng = random.Random(0)
    prompts = [(ex.prompt, ex.answer) for ex in (task.sample(rng) for _ in range(args.prompts * (args.steps + 2)))]
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        model, tok = tiny_model(0)
        save_hf(model, tok, d / "model")
        rounds = []  # tether and TRL alternate, one full run each per round, so load drifts hit both
        for k in range(args.rounds):
            (d / f"round{k}").mkdir()
            t = run_tether(d / f"round{k}", args)
            r = run_trl(d / "model", prompts, args)
            rounds.append((statistics.mean(t["step_times"][args.warmup:]), statistics.mean(r["step_times"][args.warmup:])))
    tether_s = statistics.median(a for a, _ in rounds)
    trl_s = statistics.median(b for _, b in rounds)
    tokens = statistics.mean(t["tokens"][args.warmup:])
    result = {
        "shape": f"{args.prompts} prompts x {args.generations} generations x <= {args.new_tokens} tokens",
        "params": sum(p.numel() for p in model.parameters()), "threads": args.threads, "steps": args.steps,
        "tether_s_per_step": tether_s, "trl_s_per_step": trl_s, "ratio_tether_over_trl": tether_s / trl_s,
        "tether_tokens_per_s": tokens / tether_s, "tether_phases_s": t["phases"],
        "rounds_s_per_step_tether_trl": rounds,
    }
    print(json.dumps(result, indent=2))
    print(f"tether {tether_s:.3f} s/step, TRL {trl_s:.3f} s/step: tether takes {tether_s / trl_s:.2f}x TRL's time "
          f"(goal <= 0.33x)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
