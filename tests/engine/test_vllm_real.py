"""The real vLLM server (``.venv-vllm``) as tether's rollout engine, on the built-in tiny model.

Runs when ``.venv-vllm`` exists or ``TETHER_VLLM=1`` (then a missing venv fails instead of skipping);
``make test-vllm`` sets it up and runs these. Tolerances: fp32 vLLM and tether's fp32 recomputation
agree to about 1e-6 nats per token here (measured); the tests allow 1e-4.
"""

import copy
import json
import os
from pathlib import Path

import pytest
import torch

from tether.engine.vllm_engine import VLLMEngine, VLLMOptions, default_python
from tether.models.builtin import tiny_model
from tether.models.logprobs import token_logprobs
from tether.models.tiny import save_hf
from tether.rollout import SamplingParams

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(os.environ.get("TETHER_VLLM") != "1" and not Path(default_python()).is_file(),
                       reason="needs .venv-vllm (scripts/setup_vllm.sh) or TETHER_VLLM=1"),
]

FP32_TOL = 1e-4
PARAMS = [SamplingParams(max_new_tokens=12), SamplingParams(temperature=0.7, top_k=20, max_new_tokens=12),
          SamplingParams(top_p=0.9, max_new_tokens=12)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, tok = tiny_model(0)
    return model.eval(), tok, save_hf(model, tok, tmp_path_factory.mktemp("tiny-hf"))


def start(tiny, dtype="float32"):
    model, tok, folder = tiny
    return VLLMEngine(folder, eos_id=tok.eos_id, pad_id=tok.pad_id, vocab_size=model.config.vocab_size,
                      options=VLLMOptions(dtype=dtype))


@pytest.fixture(scope="module")
def engine(tiny):
    with start(tiny) as e:
        e.load_weights(tiny[0].state_dict(), version=0)
        yield e


def prompts(tok):
    return [tok.encode(f"{a}+{b}=") for a, b in [(3, 4), (12, 30), (7, 81), (55, 5)]]


def gap(model, rollout):
    """Per-token |log pi(token) - log mu(token)| over completion tokens, pi recomputed by tether in fp32
    under the engine's recorded truncation."""
    with torch.no_grad():
        logp, _ = token_logprobs(model, rollout, replay_truncation=True)
    return (logp - rollout.logp_mu_BT).abs()[rollout.loss_mask_BT]


@pytest.mark.parametrize("params", PARAMS, ids=["plain", "temp-topk", "topp"])
def test_fp32_logprobs_match_tether_recomputation(tiny, engine, params):
    model, tok, _ = tiny
    r = engine.generate(prompts(tok), params, seed=1, n=2)
    assert int(r.loss_mask_BT.sum()) > 20
    assert gap(model, r).max() < FP32_TOL
    again = engine.generate(prompts(tok), params, seed=1, n=2)
    assert torch.equal(again.tokens_BT, r.tokens_BT)  # per-row seeds: reproducible


def test_weight_push_changes_logprobs_to_the_new_weights(tiny, engine):
    model, tok, _ = tiny
    new = copy.deepcopy(model)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.05 * torch.randn_like(p, generator=None))
    engine.load_weights(new.state_dict(), version=engine.version + 1)
    try:
        r = engine.generate(prompts(tok), PARAMS[0], seed=2, n=2)
        assert (r.version_BT[r.loss_mask_BT] == engine.version).all()
        assert gap(new, r).max() < FP32_TOL
        assert gap(model, r).mean() > 0.05  # the old weights no longer explain the samples
    finally:
        engine.load_weights(model.state_dict(), version=engine.version + 1)
    r = engine.generate(prompts(tok), PARAMS[0], seed=2, n=2)
    assert gap(model, r).max() < FP32_TOL


def test_bf16_engine_shows_a_real_but_small_mismatch(tiny):
    model, tok, _ = tiny
    with start(tiny, dtype="bfloat16") as e:
        e.load_weights(model.state_dict(), version=0)
        r = e.generate(prompts(tok), PARAMS[0], seed=3, n=4)
    d = gap(model, r)
    assert 1e-4 < float(d.mean()) < 0.2  # bf16 rounding: far above fp32's 1e-6, far below a wrong model's ~1


def test_train_cli_with_vllm_engine(tmp_path, monkeypatch):
    from tether.cli import main

    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    rc = main(["train", "--engine", "vllm", "--steps", "3", "--prompts-per-step", "4", "--group-size", "4",
               "--warmstart-steps", "50", "--eval-size", "16", "--no-progress", "--out", str(out)])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == [0, 1, 2]
    for m in rows:  # weights pushed every step: engine and trainer agree to fp32 rounding
        assert m["mismatch/abs_logp_diff_mean"] < 1e-4
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
