"""``tether engine-check``: run every installed engine on one small model and classify its log-probs.

Each probe samples ``max_new_tokens`` tokens for ``batch`` random prompts of ``prompt_len`` ids under
one fixed seed and sampling transform, returning the engine's own per-token log-probs ``r``. The
model (float32, the same weights the engine ran) then scores the engine's tokens teacher-forced, and
:func:`tether.engine.conformance.classify_logprobs` names what ``r`` is (sampled, raw, off by one...).
EOS is disabled in every probe (``eos_id=-1``: an id no token has, ``eos_token_id=None`` for
``generate``), so every row has exactly ``max_new_tokens`` tokens: the check is about log-probs, not
stopping. Tokens/s is ``batch * max_new_tokens`` over the wall time of the fastest of three generation
calls after one warm-up call (a comparison figure at this size, not a benchmark).

Probes: ``torch-builtin`` (the built-in tiny model), ``torch-lean`` and ``torch-stock`` (the torch
engine on the Hugging Face model, lean decode path and stock forward), ``hf-generate-scores`` and
``hf-generate-logits`` (``transformers`` ``generate`` with ``output_scores`` / ``output_logits``,
log-probs from ``compute_transition_scores(normalize_logits=True)``), ``vllm`` (the vLLM engine's server
on the same weights; skipped when there is no ``.venv-vllm`` python), ``llama-cpp`` (always skipped:
no probe yet; the row says whether ``llama_cpp`` is importable). The engines tether samples with
(:data:`USED_BY_TETHER`) must classify as ``sampled``; a probe that raises is an ``error`` row.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from tether.engine.conformance import SAMPLED, candidate_logprobs, classify_logprobs
from tether.rollout import SamplingParams

USED_BY_TETHER = ("torch-builtin", "torch-lean", "torch-stock", "vllm")
"""The probes of engines tether samples with (``--engine torch`` / ``vllm``): they must return ``sampled``."""


@dataclass(frozen=True)
class EngineCheckConfig:
    """Settings of one ``tether engine-check`` run (validated here, for the CLI and the Python API alike)."""

    model: str | None = None
    """A Hugging Face folder, ``.gguf`` file or alias (``smollm2``); None: a tiny random Llama built from a config."""
    seed: int = 0
    """Seed of the prompts, of the random models and of every engine's sampling."""
    batch: int = 4
    """Number of prompts."""
    prompt_len: int = 8
    """Random prompt ids per row."""
    max_new_tokens: int = 16
    """Tokens sampled per row (>= 2, so an off-by-one shows)."""
    temperature: float = 0.7
    """Sampling temperature (not 1, so raw and processed log-probs differ)."""
    top_k: int | None = 20
    """Top-k of the transform (None: off)."""
    top_p: float | None = 0.9
    """Top-p of the transform (None: off)."""
    tol: float = 1e-4
    """A candidate matches when its max abs difference to the returned log-probs is at most this."""
    engines: tuple[str, ...] = ()
    """Probes to run (names from :data:`PROBES`); empty: all."""
    threads: int = 1
    """torch intra-op threads during the run (restored afterwards): one by default, so tokens/s of
    these small batches does not depend on how busy the other cores are."""

    def __post_init__(self) -> None:
        for name, least in (("batch", 1), ("prompt_len", 1), ("max_new_tokens", 2), ("threads", 1)):
            if int(getattr(self, name)) < least:
                raise ValueError(f"engine-check: {name} must be >= {least}, got {getattr(self, name)}")
        try:
            _ = self.sampling  # the transform's own checks (temperature, top_k, top_p)
        except ValueError as e:
            raise ValueError(f"engine-check: {e}") from None
        if not self.tol >= 0:
            raise ValueError(f"engine-check: tol must be >= 0, got {self.tol}")
        unknown = [e for e in self.engines if e not in PROBES]
        if unknown:
            raise ValueError(f"engine-check: unknown engine(s) {unknown}; choose from {', '.join(PROBES)}")

    @property
    def sampling(self) -> SamplingParams:
        """The transform every probe samples under."""
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              max_new_tokens=self.max_new_tokens)


@dataclass
class EngineResult:
    """One row of the report."""

    engine: str
    used_by_tether: bool
    """Tether samples with this engine: it must classify as ``sampled``."""
    status: str
    """``ran``, ``skipped`` (not installed) or ``error`` (the probe raised: the note says what)."""
    kind: str | None = None
    """The classification (:func:`~tether.engine.conformance.classify_logprobs`), None when skipped."""
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    matches: tuple[str, ...] = ()
    """Every candidate within tolerance (several when the transform does not separate them)."""
    tokens_per_s: float | None = None
    note: str = ""
    """What ran (decode path, model) or why it was skipped."""

    @property
    def passed(self) -> bool:
        """Skipped, not used by tether, or ran with ``sampled`` among the matches (alone, or tied with a candidate that
        this transform makes equal to it, e.g. ``tempered`` without truncation)."""
        return self.status == "skipped" or not self.used_by_tether or SAMPLED in self.matches

    def to_dict(self) -> dict:
        """JSON-ready: an infinite difference (a returned log-prob where the candidate is ``-inf``, or a
        candidate with no defined entry) is written as null."""
        d = asdict(self)
        d["max_abs_diff"] = {k: (v if math.isfinite(v) else None) for k, v in self.max_abs_diff.items()}
        return {**d, "passed": self.passed}


@dataclass
class _Setup:
    cfg: EngineCheckConfig
    hf_model: torch.nn.Module | None
    model_name: str
    prompts_BP: Tensor

    @property
    def sampling(self) -> SamplingParams:
        return self.cfg.sampling


def tiny_llama(seed: int, vocab_size: int = 128) -> torch.nn.Module:
    """A random Llama (GQA, 2 layers) with weights large enough that its distributions are far from
    uniform, so truncation and temperature change the log-probs visibly."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   initializer_range=0.2, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).eval()


def _timed(fn: Callable[[], tuple], n_tokens: int, repeats: int = 3) -> tuple[tuple, float]:
    """``(fn(), n_tokens / the fastest of `repeats` timed calls)``, after one warm-up call (weight
    fusion, allocator, kernel selection). Every call uses the same seed and returns the same thing; the
    fastest call is the one least disturbed by other processes on a shared machine."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return out, n_tokens / max(best, 1e-9)


def _torch_engine(model, prompts_BP: Tensor, params, seed: int, **kw) -> tuple[Tensor, Tensor, str]:
    from tether.engine.torch_engine import TorchEngine

    engine = TorchEngine(model, eos_id=-1, pad_id=0, **kw)
    r = engine.generate(prompts_BP.tolist(), params, seed=seed)
    P, N = prompts_BP.shape[1], params.max_new_tokens
    path = engine.decode_path if engine.lean_reason is None else f"{engine.decode_path} ({engine.lean_reason})"
    return r.tokens_BT[:, P:P + N], r.logp_mu_BT[:, P:P + N], path


def _score(model, prompts_BP: Tensor, tokens_BN: Tensor, cfg: EngineCheckConfig) -> dict[str, Tensor]:
    """Every candidate, from ``model``'s teacher-forced logits on prompt + the engine's tokens."""
    from tether.models.logprobs import sequence_logits

    P, N = prompts_BP.shape[1], tokens_BN.shape[1]
    seq_BT = torch.cat([prompts_BP, tokens_BN], 1)
    with torch.no_grad():
        logits_BNV = sequence_logits(model, seq_BT, torch.ones_like(seq_BT, dtype=torch.bool), first=P - 1)[:, :N]
    return candidate_logprobs(logits_BNV, tokens_BN, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)


def _finish(name: str, s: _Setup, model, tokens_BN: Tensor, logp_BN: Tensor, tps: float, note: str) -> EngineResult:
    if tokens_BN.shape != (s.cfg.batch, s.cfg.max_new_tokens):
        raise RuntimeError(f"engine-check: {name} returned tokens of shape {tuple(tokens_BN.shape)}, expected "
                           f"{(s.cfg.batch, s.cfg.max_new_tokens)} (did a row stop early?)")
    v = classify_logprobs(logp_BN.float(), _score(model, s.prompts_BP, tokens_BN, s.cfg), tol=s.cfg.tol)
    return EngineResult(name, name in USED_BY_TETHER, "ran", v.kind, v.max_abs_diff, v.matches, tps, note)


def probe_builtin(name: str, s: _Setup) -> EngineResult:
    from tether.models.tiny import TinyConfig, TinyLM

    torch.manual_seed(s.cfg.seed)  # prompt ids are < 99, the built-in vocabulary
    model = TinyLM(TinyConfig(d_model=64, n_layers=2, n_heads=4, d_ff=128, init_std=0.2)).eval()
    (tokens, logp, path), tps = _timed(lambda: _torch_engine(model, s.prompts_BP, s.sampling, s.cfg.seed),
                                       s.cfg.batch * s.cfg.max_new_tokens)
    return _finish(name, s, model, tokens, logp, tps, f"built-in tiny model, path {path}")


def _probe_torch_hf(lean: bool):
    def probe(name: str, s: _Setup) -> EngineResult:
        (tokens, logp, path), tps = _timed(
            lambda: _torch_engine(s.hf_model, s.prompts_BP, s.sampling, s.cfg.seed, lean=lean),
            s.cfg.batch * s.cfg.max_new_tokens)
        return _finish(name, s, s.hf_model, tokens, logp, tps, f"{s.model_name}, path {path}")
    return probe


def _probe_generate(which: str):
    """``transformers`` ``generate``; log-probs from its ``scores`` (processed) or ``logits`` (raw) output."""
    def probe(name: str, s: _Setup) -> EngineResult:
        c, model = s.cfg, s.hf_model

        def run() -> tuple[Tensor, Tensor]:
            torch.manual_seed(c.seed)
            with torch.no_grad():
                out = model.generate(
                    input_ids=s.prompts_BP, attention_mask=torch.ones_like(s.prompts_BP), do_sample=True,
                    temperature=c.temperature, top_k=c.top_k or 0, top_p=1.0 if c.top_p is None else c.top_p,
                    max_new_tokens=c.max_new_tokens, eos_token_id=None, pad_token_id=0, output_scores=True,
                    output_logits=True, return_dict_in_generate=True)
                scores = out.scores if which == "scores" else out.logits
                logp = model.compute_transition_scores(out.sequences, scores, normalize_logits=True)
            return out.sequences[:, s.prompts_BP.shape[1]:], logp

        (tokens, logp), tps = _timed(run, c.batch * c.max_new_tokens)
        return _finish(name, s, model, tokens, logp, tps, f"{s.model_name}, generate output_{which}")
    return probe


def _skipped(reason: Callable[[], str]):
    def probe(name: str, s: _Setup) -> EngineResult:
        return EngineResult(name, False, "skipped", note=reason())
    return probe


VLLM_COMMAND: list[str] | None = None
"""The vLLM server command line (None: the vLLM venv's python running ``vllm_server.py``); tests
point it at a stand-in server."""


def probe_vllm(name: str, s: _Setup) -> EngineResult:
    """The vLLM engine (a server in ``.venv-vllm``, fp32) on the Hugging Face model, saved to a
    temporary folder; skipped when no vLLM python exists. Without ``record_support`` (the kept counts
    come from full-vocabulary log-probs, which vLLM caps): the check reads only the returned log-probs."""
    import tempfile

    from tether.engine.vllm_engine import VLLMEngine, VLLMOptions, default_python

    if VLLM_COMMAND is None and not Path(default_python()).is_file():
        return EngineResult(name, True, "skipped", note=f"no vLLM python at {default_python()} "
                                                         "(scripts/setup_vllm.sh makes .venv-vllm)")
    with tempfile.TemporaryDirectory(prefix="tether-engine-check-") as folder:
        s.hf_model.save_pretrained(folder, safe_serialization=True)
        engine = VLLMEngine(folder, eos_id=-1, pad_id=0, vocab_size=int(s.hf_model.config.vocab_size),
                            options=VLLMOptions(seed=s.cfg.seed, record_support=False), command=VLLM_COMMAND)
        try:
            P, N = s.prompts_BP.shape[1], s.cfg.max_new_tokens

            def run() -> tuple[Tensor, Tensor]:
                r = engine.generate(s.prompts_BP.tolist(), s.sampling, seed=s.cfg.seed)
                return r.tokens_BT[:, P:P + N], r.logp_mu_BT[:, P:P + N]

            (tokens, logp), tps = _timed(run, s.cfg.batch * N)
        finally:
            engine.close()
    return _finish(name, s, s.hf_model, tokens, logp, tps, f"{s.model_name}, vLLM server, fp32")


def _llama_cpp_reason() -> str:
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return "llama_cpp (llama-cpp-python) is not importable"
    return "llama-cpp-python is importable, but this check has no llama.cpp probe yet"


PROBES: dict[str, Callable[[str, _Setup], EngineResult]] = {
    "torch-builtin": probe_builtin,
    "torch-lean": _probe_torch_hf(lean=True),
    "torch-stock": _probe_torch_hf(lean=False),
    "hf-generate-scores": _probe_generate("scores"),
    "hf-generate-logits": _probe_generate("logits"),
    "vllm": probe_vllm,
    "llama-cpp": _skipped(_llama_cpp_reason),
}
"""Every probe, in report order."""


def _guarded(name: str, setup: _Setup) -> EngineResult:
    """One probe; an engine that fails to run is a row with status ``error`` (failed when tether uses it)."""
    try:
        return PROBES[name](name, setup)
    except Exception as e:  # noqa: BLE001 (any engine failure is reported, the other probes still run)
        return EngineResult(name, name in USED_BY_TETHER, "error", note=f"{type(e).__name__}: {e}")


HF_PROBES = ("torch-lean", "torch-stock", "hf-generate-scores", "hf-generate-logits", "vllm")
"""The probes that run the Hugging Face model (skipped without ``transformers``)."""


def transformers_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformers") is not None


def run_engine_check(cfg: EngineCheckConfig) -> list[EngineResult]:
    """Run the chosen probes (all by default), in :data:`PROBES` order. Without ``transformers`` the
    built-in model's probe still runs and the Hugging Face ones are skipped rows (``--model`` is refused)."""
    has_hf = transformers_available()
    if cfg.model is not None and not has_hf:
        raise ValueError("engine-check: --model needs transformers (pip install -e '.[hf]')")
    model, name = None, "no Hugging Face model"
    if cfg.model is not None:
        from tether.models.hf import load_hf

        model, name = load_hf(cfg.model)[0], cfg.model
    elif has_hf:
        model, name = tiny_llama(cfg.seed), "tiny random Llama"
    V = 99 if model is None else int(model.config.vocab_size)
    g = torch.Generator().manual_seed(cfg.seed)
    prompts_BP = torch.randint(1, min(V, 99), (cfg.batch, cfg.prompt_len), generator=g)  # ids every model embeds
    setup = _Setup(cfg, model, name, prompts_BP)
    chosen = cfg.engines or tuple(PROBES)
    before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return [EngineResult(e, e in USED_BY_TETHER, "skipped", note="needs transformers (pip install -e '.[hf]')")
                if model is None and e in HF_PROBES else _guarded(e, setup) for e in PROBES if e in chosen]
    finally:
        torch.set_num_threads(before)
