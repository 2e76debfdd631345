"""Decode throughput: TorchEngine vs ``transformers`` ``generate`` on the same tiny model.

The built-in tiny model (default ``TinyConfig``, ~1.8 M parameters) is exported with ``save_hf``
and reloaded as ``LlamaForCausalLM``; both sides sample (temperature 1, no top-k / top-p) in fp32
the same number of new tokens per row with no early stop, from the same prompts. Reported:
generated tokens per second (batch x new tokens / wall time of one call, prefill included), the
median of ``--repeats`` timed calls after one warm-up call each. The three contenders run
interleaved (one call of each per round), so load from other processes hits all of them alike.

    python benchmarks/engine_decode.py [--batch 8 32] [--new-tokens 64] [--repeats 9] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from tether.engine.torch_engine import TorchEngine
from tether.models.tiny import TinyConfig, TinyLM, save_hf
from tether.models.tokenizer import CharTokenizer
from tether.rollout import SamplingParams


def interleaved_medians(fns: dict, repeats: int) -> dict[str, float]:
    """Median wall time of each function over ``repeats`` rounds; every round calls each once."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import LlamaForCausalLM

    tok = CharTokenizer()
    torch.manual_seed(0)
    model = TinyLM(TinyConfig(vocab_size=tok.vocab_size)).eval()
    N = args.new_tokens
    rows = []
    with tempfile.TemporaryDirectory() as d:
        save_hf(model, tok, d)
        hf = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        # eos_id=-1: no id matches, so every row generates exactly N tokens (no early stop)
        engine = TorchEngine(model, eos_id=-1, pad_id=tok.pad_id, copy=True)
        engine_hf = TorchEngine(hf, eos_id=-1, pad_id=tok.pad_id)
        params = SamplingParams(temperature=1.0, max_new_tokens=N)
        for B in args.batch:
            prompts = [tok.encode(f"{10 + i % 90}+{37 + i % 50}=") for i in range(B)]
            ids = torch.tensor(prompts)

            def run_engine(e=engine, prompts=prompts, B=B):
                r = e.generate(prompts, params, seed=0)
                assert int(r.completion_len_B.sum()) == B * N

            def run_engine_hf(prompts=prompts):
                engine_hf.generate(prompts, params, seed=0)

            def run_generate(ids=ids):
                with torch.inference_mode():
                    out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                      top_k=0, top_p=1.0, max_new_tokens=N, min_new_tokens=N,
                                      pad_token_id=tok.pad_id, eos_token_id=tok.eos_id)
                assert out.shape[1] == ids.shape[1] + N

            t = interleaved_medians({"engine": run_engine, "engine_hf": run_engine_hf, "generate": run_generate},
                                    args.repeats)
            rows.append((B, B * N / t["engine"], B * N / t["engine_hf"], B * N / t["generate"]))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {model.num_params() / 1e6:.2f} M params, "
          f"{N} new tokens, fp32, temperature 1, median of {args.repeats} interleaved calls")
    print(f"{'batch':>5} | {'TorchEngine (built-in)':>22} | {'TorchEngine (HF model)':>22} | "
          f"{'HF generate':>11} | ratio")
    for B, te, teh, tg in rows:
        print(f"{B:>5} | {te:>18.0f} t/s | {teh:>18.0f} t/s | {tg:>7.0f} t/s | {te / tg:.2f}x")


if __name__ == "__main__":
    main()
