"""Decode throughput: TorchEngine vs ``transformers`` ``generate`` on the same tiny model.

The built-in tiny model (default ``TinyConfig``, ~1.8 M parameters) is exported with ``save_hf``
and reloaded as ``LlamaForCausalLM``; both sides sample (temperature 1, no top-k / top-p) in fp32
the same number of new tokens per row with no early stop, from the same prompts. Reported:
generated tokens per second (batch x new tokens / wall time, prefill included), best of
``--repeats`` timed runs after one warm-up run.

    python benchmarks/engine_decode.py [--batch 8 32] [--new-tokens 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from tether.engine.torch_engine import TorchEngine
from tether.models.tiny import TinyConfig, TinyLM, save_hf
from tether.models.tokenizer import CharTokenizer
from tether.rollout import SamplingParams


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
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

            t_engine = best_time(run_engine, args.repeats)
            t_engine_hf = best_time(run_engine_hf, args.repeats)
            t_gen = best_time(run_generate, args.repeats)
            rows.append((B, B * N / t_engine, B * N / t_engine_hf, B * N / t_gen))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {model.num_params() / 1e6:.2f} M params, "
          f"{N} new tokens, fp32, temperature 1")
    print(f"{'batch':>5} | {'TorchEngine (built-in)':>22} | {'TorchEngine (HF model)':>22} | "
          f"{'HF generate':>11} | ratio")
    for B, te, teh, tg in rows:
        print(f"{B:>5} | {te:>18.0f} t/s | {teh:>18.0f} t/s | {tg:>7.0f} t/s | {te / tg:.2f}x")


if __name__ == "__main__":
    main()
