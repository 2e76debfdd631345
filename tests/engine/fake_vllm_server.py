"""A stand-in for the vLLM server that speaks the real protocol (it runs the real
``tether.engine.vllm_server.serve`` loop) with a trivially predictable "model", so the client's
record keeping, weight-push schedule, start-up and shutdown can be tested without vLLM.

Row i with seed s generates tokens ``(s + j) % V`` for j = 0, 1, ... (stopping after a stop token);
each token's log-prob is ``-(w + 0.01 j)`` where ``w`` is the number of weight pushes so far.
``FAKE_VLLM_MODE``: ``crash`` exits at start-up, ``hang`` never gets ready; ``FAKE_VLLM_HANDSHAKE_S``:
the key-handshake timeout (default 10 s).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tether.engine.vllm_server import exit_with_parent, serve  # noqa: E402


class FakeServer:
    def __init__(self, model: str) -> None:
        self.vocab_size = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
        self.pushes: list[list[str]] = []
        self.seeds: list[int] = []

    def info(self) -> dict:
        return {"vocab_size": self.vocab_size, "max_model_len": 64, "dtype": "float32", "max_logprobs": 20,
                "pushes": self.pushes, "seeds": self.seeds}

    def generate(self, prompts, seeds, temperature, top_k, top_p, max_tokens, stop_token_ids, kept_counts) -> dict:
        self.seeds = list(seeds)
        rows = []
        for s in seeds:
            ids, stopped = [], False
            for j in range(max_tokens):
                ids.append((s + j) % self.vocab_size)
                if ids[-1] in stop_token_ids:
                    stopped = True
                    break
            logps = [-(len(self.pushes) + 0.01 * j) for j in range(len(ids))]
            rows.append({"token_ids": ids, "logprobs": logps, "stopped": stopped,
                         "kept": [7] * len(ids) if kept_counts else None})
        return {"rows": rows}

    def load_weights(self, path: str) -> dict:
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            self.pushes.append(sorted(f.keys()))
        return {"loaded": len(self.pushes[-1])}


def main() -> int:
    args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
    mode = os.environ.get("FAKE_VLLM_MODE", "")
    if mode == "crash":
        print("fake server: boom at start-up", flush=True)
        return 3
    if "--parent-pid" in args:
        exit_with_parent(int(args["--parent-pid"]), period_s=0.2)
    if mode == "hang":
        time.sleep(60)
        return 0
    handshake = float(os.environ.get("FAKE_VLLM_HANDSHAKE_S", "10"))
    serve(FakeServer(args["--model"]), args["--ready-file"], bytes.fromhex(os.environ["TETHER_VLLM_AUTHKEY"]),
          handshake_timeout_s=handshake)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
