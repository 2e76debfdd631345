"""vLLM as tether's rollout engine: a client for :mod:`tether.engine.vllm_server`.

``VLLMEngine`` is an :class:`~tether.engine.base.Engine` (``generate``, ``load_weights``, ``close``,
``version``, ``pad_id``, ``vocab_size``, ``eos_ids``; also ``max_len`` and ``eos_id``, as
``TorchEngine``). It starts the server as a subprocess with
the python of the separate vLLM environment (``.venv-vllm``, made by ``scripts/setup_vllm.sh``),
waits until it is listening on loopback, and stops it on :meth:`close` (also at interpreter exit and
when used as a context manager).

* ``generate`` sends prompt token ids with one explicit seed per row and records vLLM's own
  log-prob of each sampled token as ``logp_mu`` (vLLM ``processed_logprobs``: the distribution after
  temperature / top-k / top-p, tether's convention). The trainer recomputes ``logp_old`` itself, so
  the meter reports the real engine/trainer gap.
* ``load_weights`` writes the state dict to a safetensors file and the server loads it into the
  running model in place. With ``sync_every = k`` only every k-th version is pushed: the engine keeps
  sampling from the last pushed version, and every token records that version (the staleness is
  real and visible to the meter).
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Client
from pathlib import Path

import torch
from torch import Tensor

from tether.engine.partial import assemble
from tether.engine.torch_engine import eos_ids
from tether.rollout import Rollout, SamplingParams

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVER_SCRIPT = Path(__file__).with_name("vllm_server.py")
SETUP_HINT = "run scripts/setup_vllm.sh (creates .venv-vllm with vLLM)"

CPU_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
"""vLLM-CPU uses one core unless told to bind its OpenMP threads to both (set only if unset)."""


def default_python() -> str:
    """The vLLM venv's python: ``$TETHER_VLLM_PYTHON``, else ``<repo>/.venv-vllm/bin/python``."""
    return os.environ.get("TETHER_VLLM_PYTHON") or str(REPO_ROOT / ".venv-vllm" / "bin" / "python")


class VLLMServerError(RuntimeError):
    """The vLLM server failed to start, died, or answered a request with an error."""


@dataclass(frozen=True)
class VLLMOptions:
    dtype: str = "float32"
    """vLLM model dtype: float32, bfloat16 or float16."""
    sync_every: int = 1
    """Push weights to the server every k-th version (k - 1 versions of staleness at most)."""
    python: str | None = None
    """Python of the vLLM environment (None: :func:`default_python`)."""
    startup_timeout_s: float = 600.0
    """Give up if the server is not listening after this long."""
    max_model_len: int | None = None
    """vLLM's context length (None: the model config's)."""
    seed: int = 0
    """vLLM's engine seed (every request also carries its own seed)."""
    record_support: bool = True
    """Record the top-p support size of every token (for the trainer's truncation replay); off, a
    top-p rollout carries no kept counts and needs no full-vocabulary log-probs."""

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"VLLMOptions.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.sync_every < 1:
            raise ValueError(f"VLLMOptions.sync_every must be >= 1, got {self.sync_every}")
        if not self.startup_timeout_s > 0:
            raise ValueError(f"VLLMOptions.startup_timeout_s must be > 0, got {self.startup_timeout_s}")


class VLLMEngine:
    """Rollout engine backed by a vLLM server process (see the module docstring).

    Args:
        model_dir: a Hugging Face model folder (``config.json`` + safetensors) with the initial weights.
        eos_id: the stop token id, or several (passed to vLLM as stop token ids; kept in the completion).
        pad_id: filler for padding (defaults to the first EOS id; masks never depend on it).
        vocab_size: the trainer's vocabulary size (checked against the server's).
        options: :class:`VLLMOptions`.
        own_model_dir: remove ``model_dir`` on :meth:`close` (a folder written only for this engine).
        command: the server command line (tests start a fake server with it); default: the vLLM
            venv's python running ``vllm_server.py``.
    """

    def __init__(self, model_dir: str | Path, *, eos_id: int | Sequence[int], pad_id: int | None = None, vocab_size: int,
                 options: VLLMOptions = VLLMOptions(), command: Sequence[str] | None = None, version: int = 0,
                 own_model_dir: bool = False) -> None:
        self.eos_ids = eos_ids(eos_id)
        self.eos_id = self.eos_ids[0]
        self.pad_id = self.eos_id if pad_id is None else int(pad_id)
        self.vocab_size = int(vocab_size)
        self.options = options
        self.version = int(version)
        self.pushed_version: int | None = None
        self.device = torch.device("cpu")
        self.push_seconds = 0.0
        self._proc: subprocess.Popen | None = None
        self._conn = None
        self._tmp = Path(tempfile.mkdtemp(prefix="tether-vllm-"))
        self._log_path = self._tmp / "server.log"
        self._owned = Path(model_dir) if own_model_dir else None  # removed on close (a folder written for us)
        try:
            self.info = self._start(Path(model_dir), command)
        except BaseException:
            self.close()  # no server, temporary folder or model copy left behind by a failed start
            raise
        if int(self.info["vocab_size"]) != self.vocab_size:
            self.close()
            raise ValueError(f"vLLM model vocabulary ({self.info['vocab_size']}) differs from the trainer's "
                             f"({self.vocab_size}): engine and trainer must use the same vocabulary")

    # ---- process lifecycle ---------------------------------------------------------------
    def _start(self, model_dir: Path, command: Sequence[str] | None) -> dict:
        if command is None:
            python = self.options.python or default_python()
            if not Path(python).is_file():
                raise FileNotFoundError(f"vLLM engine: no python at {python}; {SETUP_HINT}")
            command = [python, str(SERVER_SCRIPT)]
        ready = self._tmp / "ready.json"
        args = [*command, "--model", str(model_dir), "--ready-file", str(ready), "--dtype", self.options.dtype,
                "--parent-pid", str(os.getpid()), "--seed", str(self.options.seed),
                "--max-logprobs", str(max(20, min(self.vocab_size, 256)))]
        if self.options.max_model_len is not None:
            args += ["--max-model-len", str(self.options.max_model_len)]
        key = secrets.token_bytes(32)
        env = {**os.environ, **{k: v for k, v in CPU_ENV.items() if k not in os.environ},
               "TETHER_VLLM_AUTHKEY": key.hex(), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        env.pop("PYTHONPATH", None)  # the server imports nothing of tether's environment
        log = open(self._log_path, "wb")
        try:
            self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=env, cwd=str(self._tmp))
        finally:
            log.close()
        atexit.register(self.close)
        deadline = time.monotonic() + self.options.startup_timeout_s
        while not ready.exists():
            if self._proc.poll() is not None:
                raise VLLMServerError(f"vLLM server exited with code {self._proc.returncode} during start-up "
                                      f"(if vLLM is missing: {SETUP_HINT}); last log lines:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise VLLMServerError(f"vLLM server not ready after {self.options.startup_timeout_s:.0f} s; "
                                      f"last log lines:\n{self.log_tail()}")
            time.sleep(0.1)
        info = json.loads(ready.read_text())
        self._conn = Client(("127.0.0.1", int(info["port"])), authkey=key)
        return info

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _call(self, op: str, **kwargs) -> dict:
        if self._conn is None:
            raise VLLMServerError("vLLM engine is closed")
        try:
            self._conn.send({"op": op, **kwargs})
            reply = self._conn.recv()
        except (EOFError, OSError) as e:
            raise VLLMServerError(f"lost the vLLM server during {op!r} ({e}); last log lines:\n{self.log_tail()}") from e
        if not reply.get("ok"):
            raise VLLMServerError(f"vLLM server: {op} failed: {reply.get('error')}")
        return reply

    def close(self) -> None:
        """Stop the server (asks it to exit, then terminates it) and remove the temporary folder."""
        asked = False
        if self._conn is not None:
            try:
                self._call("shutdown")
                asked = True
            except VLLMServerError:
                pass
            self._conn.close()
            self._conn = None
        if self._proc is not None and self._proc.poll() is None:
            try:
                self._proc.wait(timeout=30 if asked else 0.1)  # a server never connected to is not waited for
            except subprocess.TimeoutExpired:
                self._proc.terminate()
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
        self._proc = None
        shutil.rmtree(self._tmp, ignore_errors=True)
        if self._owned is not None:
            shutil.rmtree(self._owned, ignore_errors=True)
        atexit.unregister(self.close)

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the engine interface ------------------------------------------------------------
    @property
    def max_len(self) -> int | None:
        return int(self.info["max_model_len"])

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def load_weights(self, state_dict: Mapping[str, Tensor], version: int) -> None:
        """Push ``state_dict`` (Hugging Face names) to the server if ``version`` is at least
        ``sync_every`` past the last pushed one (the first call always pushes); else keep sampling
        from the pushed weights, whose version the tokens keep recording."""
        version = int(version)
        if self.pushed_version is not None and version - self.pushed_version < self.options.sync_every:
            return
        try:
            from safetensors.torch import save_file
        except ImportError as e:
            raise ImportError("the vLLM engine pushes weights as safetensors: pip install -e '.[hf]'") from e

        t0 = time.perf_counter()
        path = self._tmp / "weights.safetensors"
        tensors, seen = {}, set()
        for k, v in state_dict.items():  # tied weights (embedding = head) are written once, under the first name
            key = (v.data_ptr(), tuple(v.shape))
            if key not in seen:
                seen.add(key)
                tensors[k] = v.detach().to("cpu", torch.float32).contiguous()
        save_file(tensors, str(path))
        self._call("load_weights", path=str(path))
        self.pushed_version = self.version = version
        self.push_seconds += time.perf_counter() - t0

    def _kept_mode(self, params: SamplingParams) -> str:
        if not params.truncates:
            return "none"
        if params.top_p is None or params.top_p >= 1.0:
            return "top_k"  # the support is the k best tokens: its size is known without asking
        if not self.options.record_support:
            return "none"
        if self.vocab_size > int(self.info["max_logprobs"]):
            raise ValueError(f"vLLM engine: top_p needs the support size of every sampled token, which this engine "
                             f"reads from full-vocabulary log-probs (vocabulary {self.vocab_size} > "
                             f"{self.info['max_logprobs']}); use top_k, no truncation replay, or the torch engine")
        return "count"

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *, seed: int,
                 group_B: Tensor | None = None, n: int = 1) -> Rollout:
        """Sample ``n`` completions per prompt (rows prompt-major; row i's seed derives from ``seed`` and i)."""
        if n < 1:
            raise ValueError(f"VLLMEngine.generate: n must be >= 1, got {n}")
        if params.stop:
            raise ValueError("VLLMEngine: SamplingParams.stop strings are not supported (the server sees token ids "
                             "only); the EOS token stops a row")
        rows = [list(map(int, p)) for p in prompts for _ in range(n)]
        if not rows:
            raise ValueError("VLLMEngine.generate: no prompts")
        for i, p in enumerate(rows):
            if not p:
                raise ValueError(f"VLLMEngine.generate: prompt {i // n} is empty")
        P, N = max(len(p) for p in rows), params.max_new_tokens
        if self.max_len is not None and P + N > self.max_len:
            raise ValueError(f"VLLMEngine.generate: longest prompt ({P}) + max_new_tokens ({N}) exceeds the model's "
                             f"maximum length {self.max_len}")
        B = len(rows)
        if group_B is None:
            group_B = torch.arange(B // n).repeat_interleave(n)
        elif len(group_B) != B:
            raise ValueError(f"VLLMEngine.generate: group_B has {len(group_B)} entries for {B} rows")
        mode = self._kept_mode(params)
        seeds = [row_seed(seed, i) for i in range(B)]
        reply = self._call("generate", prompts=rows, seeds=seeds, temperature=float(params.temperature),
                           top_k=params.top_k, top_p=params.top_p, max_tokens=N, stop_token_ids=list(self.eos_ids),
                           kept_counts=mode == "count")
        out = reply["rows"]
        if len(out) != B:
            raise VLLMServerError(f"vLLM server returned {len(out)} rows for {B} prompts")
        comp = [r["token_ids"] for r in out]
        logp = [r["logprobs"] for r in out]
        if mode == "none" and params.truncates:
            kept = None  # not recorded (record_support off)
        elif mode == "top_k":
            kept = [[min(int(params.top_k), self.vocab_size)] * len(c) for c in comp]
        elif mode == "count":
            kept = [r["kept"] for r in out]
        else:
            kept = [[self.vocab_size] * len(c) for c in comp]
        ver = [[self.version] * len(c) for c in comp]
        finished = [bool(r["stopped"]) for r in out]
        rollout = assemble(rows, comp, logp, kept or [[self.vocab_size] * len(c) for c in comp], ver, finished, params,
                           group_B, pad_id=self.pad_id, vocab_size=self.vocab_size)
        if kept is None:
            rollout.kept_count_BT = None
        return rollout


def row_seed(seed: int, row: int) -> int:
    """The per-request seed of row ``row`` (vLLM seeds each request's sampler separately)."""
    return (int(seed) * 1_000_003 + row) % (2**31 - 1)


def build_vllm_engine(model: torch.nn.Module, tokenizer, options: VLLMOptions, *, hf_model: str | None = None,
                      command: Sequence[str] | None = None) -> VLLMEngine:
    """The engine for ``tether train --engine vllm`` over the trainer's ``model`` and ``tokenizer``.

    ``hf_model`` None: ``model`` is the built-in one, written as a Hugging Face (Llama) folder for the
    server (removed on :meth:`VLLMEngine.close`); else the Hugging Face model spec (folder, ``.gguf``
    or alias, as ``--model`` takes it) the trainer loaded, served from its own folder. ``options`` are
    the engine's settings (the caller derives them from its config: ``tether.train.setup``);
    ``command`` replaces the server command line (tests run a fake server). The trainer's current
    weights are pushed by the loop's first ``load_weights`` anyway."""
    from tether.models.hf import model_vocab_size

    if hf_model is None:
        from tether.models.tiny import save_hf

        folder, own = save_hf(model, tokenizer, tempfile.mkdtemp(prefix="tether-vllm-model-")), True
    else:
        from tether.models.hf import resolve_model

        folder, own = resolve_model(hf_model), False
    return VLLMEngine(folder, eos_id=tokenizer.eos_ids, pad_id=tokenizer.pad_id, vocab_size=model_vocab_size(model),
                      options=options, command=command, own_model_dir=own)
