"""The lean decode path for Llama-layout Hugging Face models (tether.engine.lean_llama) against the stock
transformers forward and the trainer's recomputation: tokens, log-probs, truncation, bf16, weight refresh,
fallbacks with their reasons, and the switch that forces the stock path. Tiny random models from configs."""

from __future__ import annotations

import logging

import pytest

transformers = pytest.importorskip("transformers")
import torch  # noqa: E402

from tether.engine import lean_llama  # noqa: E402
from tether.engine.torch_engine import TorchEngine  # noqa: E402
from tether.models.logprobs import token_logprobs  # noqa: E402
from tether.rollout import SamplingParams  # noqa: E402

pytestmark = pytest.mark.engine

V = 101
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [20], [30, 31, 32, 33]]  # unequal lengths: left padding
PARAMS = SamplingParams(temperature=1.0, max_new_tokens=10)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(kind: str, seed: int = 0, **extra) -> torch.nn.Module:
    """A random tiny model of the given family. GQA (4 query / 2 key-value heads) everywhere; the
    Llama one has a non-default rope_theta and llama3 rope scaling; the Qwen2 one non-zero q/k/v biases;
    the Qwen3 one q/k norms."""
    torch.manual_seed(seed)
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)
    if kind == "llama":
        rope = {"rope_type": "llama3", "rope_theta": 5000.0, "factor": 4.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **{**common, "rope_parameters": rope, "tie_word_embeddings": True, **extra}))
    elif kind == "qwen3":  # per-head q/k norms before RoPE (random weights, so a skipped norm shows)
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**{**common, "head_dim": 8, **extra}))
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
                layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{**common, **extra}))
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    else:
        model = transformers.MistralForCausalLM(transformers.MistralConfig(
            **{**common, "sliding_window": None, **extra}))
    return model.eval()


def max_gap_to_trainer(model, rollout) -> float:
    with torch.no_grad():
        lp, _ = token_logprobs(model, rollout)
    m = rollout.loss_mask_BT
    return float((lp - rollout.logp_mu_BT)[m].abs().max())


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mistral"])
def test_lean_path_matches_the_stock_forward_and_the_trainer(kind):
    model = tiny(kind)
    assert lean_llama.unsupported_reason(model, 64) is None
    lean = TorchEngine(model, eos_id=-1, pad_id=0)
    stock = TorchEngine(model, eos_id=-1, pad_id=0, lean=False)
    r_lean = lean.generate(PROMPTS, PARAMS, seed=3)
    r_stock = stock.generate(PROMPTS, PARAMS, seed=3)
    assert (lean.decode_path, lean.lean_reason) == ("lean", None)
    assert (stock.decode_path, stock.lean_reason) == ("stock", "disabled (lean=False)")
    assert torch.equal(r_lean.tokens_BT, r_stock.tokens_BT)  # same sampler, same noise: same tokens
    gap = max_gap_to_trainer(model, r_lean)
    assert gap < 1e-5, gap
    torch.testing.assert_close(r_lean.logp_mu_BT, r_stock.logp_mu_BT, rtol=0, atol=1e-5)


def test_lean_logits_equal_the_stock_forward_step_by_step():
    """Prefill and every decode step's logits, not only the sampled token's log-prob (fp32, left padding)."""
    model = tiny("llama", seed=1)
    B, P, N = 3, 6, 5
    tokens = torch.randint(3, V, (B, P + N), generator=torch.Generator().manual_seed(0))
    lens = torch.tensor([6, 2, 4])
    valid = torch.arange(P)[None] >= (P - lens)[:, None]
    pos = (valid.cumsum(-1) - 1).clamp(min=0)
    stepper = lean_llama.LeanStepper(lean_llama.LeanWeights(model), B, P + N)
    with torch.inference_mode():
        got = [stepper.prefill(tokens[:, :P], valid, pos)]
        got += [stepper.step(tokens[:, P + t], lens + t) for t in range(N - 1)]
    for b in range(B):  # reference: each row alone, unpadded, full sequence
        row = tokens[b, P - int(lens[b]):]
        with torch.no_grad():
            ref = model(input_ids=row[None]).logits[0].float()
        for t in range(N):
            torch.testing.assert_close(got[t][b], ref[int(lens[b]) - 1 + t], rtol=0, atol=2e-5)


def test_truncated_sampling_records_the_same_support_as_the_stock_path():
    model = tiny("qwen2", seed=2)
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=8)
    r_lean = TorchEngine(model, eos_id=-1, pad_id=0).generate(PROMPTS, params, seed=5, n=2)
    r_stock = TorchEngine(model, eos_id=-1, pad_id=0, lean=False).generate(PROMPTS, params, seed=5, n=2)
    assert torch.equal(r_lean.tokens_BT, r_stock.tokens_BT)
    assert torch.equal(r_lean.kept_count_BT, r_stock.kept_count_BT)
    assert max_gap_to_trainer(model, r_lean) < 1e-5


def test_eos_stops_rows_as_on_the_stock_path():
    model = tiny("llama", seed=3)
    params = SamplingParams(temperature=1.0, max_new_tokens=12)
    eos = list(range(3, 30))  # a quarter of the vocabulary stops: rows end at different steps
    r_lean = TorchEngine(model, eos_id=eos, pad_id=0).generate(PROMPTS, params, seed=1)
    r_stock = TorchEngine(model, eos_id=eos, pad_id=0, lean=False).generate(PROMPTS, params, seed=1)
    assert r_lean.finished_B.any()
    assert torch.equal(r_lean.completion_len_B, r_stock.completion_len_B)
    assert torch.equal(r_lean.tokens_BT, r_stock.tokens_BT)


def test_bf16_engine_fuses_bf16_weights_and_stays_close_to_the_stock_bf16_path():
    model = tiny("llama", seed=4)
    lean = TorchEngine(model, eos_id=-1, pad_id=0, dtype=torch.bfloat16, copy=True)
    stock = TorchEngine(model, eos_id=-1, pad_id=0, dtype=torch.bfloat16, copy=True, lean=False)
    r_lean = lean.generate(PROMPTS, PARAMS, seed=0)
    assert lean.decode_path == "lean"
    assert lean._lean_weights.layers[0].qkv_w.dtype == torch.bfloat16
    # score the lean path's tokens with both: bf16 rounding differs op by op, so log-probs agree loosely
    with torch.no_grad():
        lp_stock, _ = token_logprobs(stock.model, r_lean)
    m = r_lean.loss_mask_BT
    assert float((lp_stock - r_lean.logp_mu_BT)[m].abs().max()) < 0.1
    assert max_gap_to_trainer(model, r_lean) < 0.1  # against the fp32 trainer: the bf16 gap the meter reports


def test_loaded_weights_rebuild_the_fused_copy():
    model = tiny("llama", seed=5)
    engine = TorchEngine(model, eos_id=-1, pad_id=0, copy=True)
    before = engine.generate(PROMPTS, PARAMS, seed=0)
    built = engine._lean_weights
    engine.generate(PROMPTS, PARAMS, seed=0)
    assert engine._lean_weights is built  # unchanged weights: read once, reused
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight.mul_(-3.0)
        model.model.layers[0].mlp.up_proj.weight.add_(0.5)
    engine.load_weights(model.state_dict(), version=1)
    after = engine.generate(PROMPTS, PARAMS, seed=0)
    assert engine._lean_weights is not built
    assert not torch.allclose(after.logp_mu_BT, before.logp_mu_BT)
    assert max_gap_to_trainer(model, after) < 1e-5  # the new weights, not a stale mix
    assert (after.version_BT[after.loss_mask_BT] == 1).all()


def test_weights_changed_in_place_without_load_weights_are_seen():
    """share_engine_weights: the engine holds the trainer's modules and an optimiser step writes them in
    place; the parameters' version counters reveal the change even without a load_weights call."""
    model = tiny("mistral", seed=6)
    engine = TorchEngine(model, eos_id=-1, pad_id=0)
    before = engine.generate(PROMPTS, PARAMS, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model.train()
    model(input_ids=torch.tensor([[3, 4, 5, 6]]), labels=torch.tensor([[3, 4, 5, 6]])).loss.backward()
    opt.step()
    after = engine.generate(PROMPTS, PARAMS, seed=0)  # no load_weights: only the version counters tell
    assert not torch.allclose(after.logp_mu_BT, before.logp_mu_BT)
    assert max_gap_to_trainer(model.eval(), after) < 1e-5


def test_unsupported_models_fall_back_with_a_logged_reason(caplog):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=16, n_layer=1, n_head=2,
                                                                n_positions=64)).eval()
    cases = {
        "GPT2LMHeadModel is not one of the supported": gpt2,
        "rope type 'dynamic'": tiny("llama", rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4,
                                                               "factor": 2.0}),
        "hidden_act 'gelu'": tiny("mistral", hidden_act="gelu"),
        "sliding window of 8 tokens": tiny("mistral", sliding_window=8),
    }
    for want, model in cases.items():
        engine = TorchEngine(model, eos_id=-1, pad_id=0)
        with caplog.at_level(logging.WARNING, logger="tether.engine"):
            caplog.clear()
            r = engine.generate(PROMPTS, PARAMS, seed=0)
            engine.generate(PROMPTS, PARAMS, seed=1)
        assert engine.decode_path == "stock" and want in engine.lean_reason
        logged = [rec.getMessage() for rec in caplog.records if want in rec.getMessage()]
        assert len(logged) == 1, logged  # once per engine and reason
        assert max_gap_to_trainer(model, r) < 1e-5
    # a window longer than the call does not bind: lean
    engine = TorchEngine(tiny("mistral", sliding_window=32), eos_id=-1, pad_id=0)
    engine.generate(PROMPTS, PARAMS, seed=0)
    assert engine.decode_path == "lean"


def test_lora_adapters_and_autocast_fall_back():
    pytest.importorskip("peft")
    from tether.engine.kinds import RolloutPrecision
    from tether.engine.precision import PrecisionEngine
    from tether.models.lora import add_lora

    model = add_lora(tiny("llama"), r=2, alpha=4.0, target_modules="q_proj,v_proj")
    engine = TorchEngine(model, eos_id=-1, pad_id=0)
    engine.generate(PROMPTS, PARAMS, seed=0)
    assert engine.decode_path == "stock" and "q_proj" in engine.lean_reason and "LoRA" in engine.lean_reason
    unified = PrecisionEngine(tiny("llama"), precision=RolloutPrecision.BF16, unified=True, eos_id=-1, pad_id=0)
    unified.generate(PROMPTS, PARAMS, seed=0)
    assert unified.decode_path == "stock" and "autocast" in unified.lean_reason


def test_lean_decode_config_switch_reaches_the_engine(tmp_path):
    from tests.engine.hf_helpers import tiny_llama_folder
    from tether.models import hf
    from tether.train.config import TrainConfig

    folder = tiny_llama_folder(tmp_path / "m")
    _, _, on = hf.build_hf_policy(TrainConfig.from_flat(model=str(folder)))
    _, _, off = hf.build_hf_policy(TrainConfig.from_flat(model=str(folder), lean_decode=False))
    assert on.lean and not off.lean
    with pytest.raises(ValueError, match="lean_decode"):
        TrainConfig.from_flat(lean_decode=False)  # the built-in model has its own decode path


def test_training_runs_take_the_lean_path_by_default_and_the_stock_path_with_the_flag(tmp_path, monkeypatch):
    """`tether train --model FOLDER` decodes on the lean path; `--no-lean-decode` on the stock forward; in
    fp32 with one seed both sample the same tokens, so the logged rewards are equal."""
    from tests.engine.hf_helpers import tiny_llama_folder
    from tether.cli import main
    from tether.train.metrics_log import read_metrics

    folder = tiny_llama_folder(tmp_path / "m")
    paths: list[str] = []
    real = TorchEngine._stepper

    def spy(self, batch, max_len):
        stepper = real(self, batch, max_len)
        paths.append(self.decode_path)
        return stepper

    monkeypatch.setattr(TorchEngine, "_stepper", spy)
    rows = {}
    for name, flags in (("lean", []), ("stock", ["--no-lean-decode"])):
        paths.clear()
        out = tmp_path / name
        assert main(["train", "--model", str(folder), "--steps", "1", "--prompts-per-step", "2", "--group-size", "2",
                     "--max-new-tokens", "4", "--eval-size", "2", "--threads", "1", "--no-progress", "--seed", "0",
                     "--out", str(out), *flags]) == 0
        assert paths and set(paths) == {name}, paths
        rows[name] = read_metrics(out / "metrics.jsonl")
    assert [r["reward/mean"] for r in rows["lean"]] == [r["reward/mean"] for r in rows["stock"]]
