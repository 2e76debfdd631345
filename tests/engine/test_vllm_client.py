"""The vLLM engine client and its loopback protocol, against a fake server (no vLLM needed)."""

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tests.limits import CHILD_TIMEOUT_S
from tests.processes import alive, started
from tether.engine import vllm_engine
from tether.engine.vllm_engine import VLLMEngine, VLLMOptions, VLLMServerError, build_vllm_engine, row_seed
from tether.rollout import SamplingParams
from tether.train.config import EngineKind, RolloutPrecision, TrainConfig, TrainMode

pytestmark = pytest.mark.engine
pytest.importorskip("safetensors")  # weights travel to the server as a safetensors file (the hf extra)

FAKE = [sys.executable, str(Path(__file__).with_name("fake_vllm_server.py"))]
V, EOS, PAD = 11, 2, 0


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": V}))
    return tmp_path


def fake_engine(model_dir, **options):
    return VLLMEngine(model_dir, eos_id=EOS, pad_id=PAD, vocab_size=V, options=VLLMOptions(**options), command=FAKE)


def test_missing_vllm_env_names_the_setup_script(model_dir):
    with pytest.raises(FileNotFoundError, match=r"scripts/setup_vllm\.sh"):
        VLLMEngine(model_dir, eos_id=EOS, vocab_size=V, options=VLLMOptions(python="/nonexistent/.venv-vllm/bin/python"))


def _engine_folders() -> set:
    return set(Path(tempfile.gettempdir()).glob("tether-vllm-*"))


def test_server_crash_at_startup_reports_its_log_and_cleans_up(model_dir, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_MODE", "crash")
    before = _engine_folders()
    with pytest.raises(VLLMServerError, match="boom at start-up"):
        fake_engine(model_dir)
    assert _engine_folders() <= before


def test_startup_timeout_is_an_error_and_kills_the_server(model_dir, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_MODE", "hang")
    with pytest.raises(VLLMServerError, match="not ready after"):
        fake_engine(model_dir, startup_timeout_s=1.0)


def test_vocabulary_mismatch_is_refused(model_dir):
    with pytest.raises(ValueError, match="vocabulary"):
        VLLMEngine(model_dir, eos_id=EOS, vocab_size=V + 1, command=FAKE)


def test_rollout_record_matches_server_reply(model_dir):
    with fake_engine(model_dir) as engine:
        engine.load_weights({"w": torch.ones(2)}, version=5)
        prompts = [[1, 3, 4], [5]]
        r = engine.generate(prompts, SamplingParams(max_new_tokens=6), seed=9, group_B=torch.tensor([0, 1]))
        seeds = [row_seed(9, i) for i in range(2)]
        assert engine._call("info")["seeds"] == seeds
        for i, (p, s) in enumerate(zip(prompts, seeds)):
            expect = []
            for j in range(6):  # the fake's rule: (seed + j) % V, stop after EOS
                expect.append((s + j) % V)
                if expect[-1] == EOS:
                    break
            a, n = len(p), len(expect)
            assert r.prompt_len_B[i] == a and r.completion_len_B[i] == n
            assert r.tokens_BT[i, :a].tolist() == p and r.tokens_BT[i, a:a + n].tolist() == expect
            assert bool(r.finished_B[i]) == (expect[-1] == EOS)
            # one push so far: log-prob -(1 + 0.01 j) at completion token j, 0 elsewhere
            want = torch.zeros(r.tokens_BT.shape[1])
            want[a:a + n] = -(1 + 0.01 * torch.arange(n, dtype=torch.float32))
            torch.testing.assert_close(r.logp_mu_BT[i], want)
            assert r.version_BT[i, a:a + n].tolist() == [5] * n
            assert (r.version_BT[i, :a] == -1).all() and (r.version_BT[i, a + n:] == -1).all()
        assert r.kept_count_BT is None
        assert r.group_B.tolist() == [0, 1]


def test_n_repeats_prompts_with_distinct_seeds(model_dir):
    with fake_engine(model_dir) as engine:
        engine.load_weights({"w": torch.ones(1)}, version=0)
        r = engine.generate([[1, 2], [3]], SamplingParams(max_new_tokens=3), seed=1, n=2)
        assert r.prompt_len_B.tolist() == [2, 2, 1, 1]
        assert r.group_B.tolist() == [0, 0, 1, 1]
        assert engine._call("info")["seeds"] == [row_seed(1, i) for i in range(4)]
        assert len(set(engine._call("info")["seeds"])) == 4


def test_truncation_support_sizes(model_dir):
    with fake_engine(model_dir) as engine:
        engine.load_weights({"w": torch.ones(1)}, version=0)
        r = engine.generate([[1]], SamplingParams(max_new_tokens=3, top_k=4), seed=0)
        mask = r.loss_mask_BT
        assert r.kept_count_BT[mask].tolist() == [4] * int(mask.sum())  # top-k alone: k, no server round trip
        r = engine.generate([[1]], SamplingParams(max_new_tokens=3, top_p=0.5), seed=0)
        assert r.kept_count_BT[r.loss_mask_BT].tolist() == [7] * int(r.loss_mask_BT.sum())  # counted by the server
    with fake_engine(model_dir, record_support=False) as engine:
        engine.load_weights({"w": torch.ones(1)}, version=0)
        r = engine.generate([[1]], SamplingParams(max_new_tokens=3, top_p=0.5), seed=0)
        assert r.kept_count_BT is None  # not asked for: no full-vocabulary log-probs


def test_top_p_support_needs_a_small_vocabulary(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 300}))
    with VLLMEngine(tmp_path, eos_id=EOS, vocab_size=300, command=FAKE) as engine:
        with pytest.raises(ValueError, match="top_p needs the support size"):
            engine.generate([[1]], SamplingParams(max_new_tokens=2, top_p=0.9), seed=0)


def test_sync_every_pushes_every_kth_version_and_tokens_record_it(model_dir):
    with fake_engine(model_dir, sync_every=3) as engine:
        seen = []
        for v in range(7):
            engine.load_weights({"a": torch.full((2,), float(v)), "b": torch.zeros(1)}, version=v)
            r = engine.generate([[1]], SamplingParams(max_new_tokens=2), seed=v)
            seen.append(int(r.version_BT[r.loss_mask_BT][0]))
        assert seen == [0, 0, 0, 3, 3, 3, 6]
        assert len(engine._call("info")["pushes"]) == 3


def test_tied_weights_are_written_once(model_dir):
    with fake_engine(model_dir) as engine:
        emb = torch.randn(3, 2)
        engine.load_weights({"model.embed_tokens.weight": emb, "lm_head.weight": emb, "x": torch.ones(1)}, version=0)
        assert engine._call("info")["pushes"] == [["model.embed_tokens.weight", "x"]]


def test_close_stops_the_server_and_removes_its_files(model_dir):
    engine = fake_engine(model_dir)
    try:
        proc, tmp = engine._proc, engine._tmp
        engine.close()
        assert proc.poll() is not None and not tmp.exists()
        with pytest.raises(VLLMServerError, match="closed"):
            engine.generate([[1]], SamplingParams(max_new_tokens=2), seed=0)
    finally:
        engine.close()  # idempotent (and the server is stopped even when an assert above fails)


PARENT_WATCH_WAIT_S = 120.0
"""The fake server checks its parent every 0.2 s; 600x that leaves room for a busy machine."""


def test_server_exits_when_its_parent_is_killed(model_dir):
    """A killed trainer runs no clean-up; its server must not outlive it."""
    code = ("import sys, os; sys.path.insert(0, '.'); from pathlib import Path; "
            "from tests.engine.test_vllm_client import fake_engine; "
            f"e = fake_engine(Path({str(model_dir)!r})); print(e.pid, e._tmp, flush=True); os._exit(9)")
    # the child and the server it starts share a process group: leaving the block kills both, so a
    # server that does not exit on its own is still stopped, after the check below has seen it
    with started([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as child:
        out, _ = child.communicate(timeout=CHILD_TIMEOUT_S)  # reaped: the server's watch now sees it gone
        pid, folder = out.split()
        deadline = time.monotonic() + PARENT_WATCH_WAIT_S
        while alive(int(pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        outlived = alive(int(pid))
    shutil.rmtree(folder, ignore_errors=True)  # the killed parent could not remove it
    assert not outlived, f"server {pid} outlived its killed parent by {PARENT_WATCH_WAIT_S} s"


def test_errors_before_the_server(model_dir):
    with fake_engine(model_dir) as engine:
        with pytest.raises(ValueError, match="stop strings"):
            engine.generate([[1]], SamplingParams(max_new_tokens=2, stop=("x",)), seed=0)
        with pytest.raises(ValueError, match="maximum length 64"):
            engine.generate([[1] * 60], SamplingParams(max_new_tokens=5), seed=0)
        with pytest.raises(ValueError, match="prompt 0 is empty"):
            engine.generate([[]], SamplingParams(max_new_tokens=2), seed=0)


def test_config_validation_names_the_field():
    assert TrainConfig.from_flat().engine is EngineKind.TORCH
    with pytest.raises(ValueError, match="'vllm_sync_every' needs engine 'vllm'"):
        TrainConfig.from_flat(vllm_sync_every=2)
    with pytest.raises(ValueError, match="'vllm_sync_every' must be >= 1"):
        TrainConfig.from_flat(engine=EngineKind.VLLM, vllm_sync_every=0)
    with pytest.raises(ValueError, match="'vllm_sync_every' needs mode 'sync'"):
        TrainConfig.from_flat(engine=EngineKind.VLLM, vllm_sync_every=2, mode=TrainMode.ASYNC, max_staleness=2)
    with pytest.raises(ValueError, match="'rollout_precision'.*int8"):
        TrainConfig.from_flat(engine=EngineKind.VLLM, rollout_precision=RolloutPrecision.INT8)
    assert TrainConfig.from_flat(engine=EngineKind.VLLM).vllm_dtype == "float32"
    assert TrainConfig.from_flat(engine=EngineKind.VLLM, rollout_precision=RolloutPrecision.BF16).vllm_dtype == "bfloat16"
    assert TrainConfig.from_flat(engine=EngineKind.VLLM, rollout_precision=RolloutPrecision.FP16).vllm_dtype == "float16"


def test_build_vllm_engine_serves_the_builtin_model_from_a_folder_it_removes():
    from tether.models.builtin import tiny_model

    model, tok = tiny_model(0)
    engine = build_vllm_engine(model, tok, VLLMOptions(sync_every=2), command=FAKE)
    try:
        folder = engine._owned
        assert json.loads((folder / "config.json").read_text())["vocab_size"] == model.config.vocab_size
        assert engine.vocab_size == model.config.vocab_size and engine.eos_ids == tok.eos_ids
        assert engine.pad_id == tok.pad_id and engine.options.sync_every == 2
    finally:
        engine.close()
    assert not folder.exists()


def test_setup_derives_the_vllm_options_from_the_config(monkeypatch, tmp_path):
    """The engine gets its own settings, not the TrainConfig: setup.py maps the config's fields onto them."""
    from tether.train import setup

    seen = {}

    def fake_build(model, tokenizer, options, *, hf_model=None):
        seen.update(options=options, hf_model=hf_model)
        return "the vllm engine"

    monkeypatch.setattr(vllm_engine, "build_vllm_engine", fake_build)
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path))  # the (0-step) warm start writes its cache file here
    cfg = TrainConfig.from_flat(engine=EngineKind.VLLM, rollout_precision=RolloutPrecision.BF16, vllm_sync_every=3, seed=4,
                      replay_truncation=False, warmstart_steps=0)
    policy = setup.build_policy(cfg, setup.build_task(cfg))
    assert policy.engine == "the vllm engine" and seen["hf_model"] is None
    assert seen["options"] == VLLMOptions(dtype="bfloat16", sync_every=3, seed=4, record_support=False)


def test_a_silent_or_wrong_key_local_connection_cannot_stall_or_crash_the_server(model_dir, tmp_path):
    """Issue 13 item 13: the server's accept loop did the key handshake with no timeout, so any local
    process that connected first and sent nothing stalled start-up forever, and one with a wrong key
    crashed the server. Now such connections are dropped and the real client is served."""
    import os
    import secrets
    import socket
    import threading
    from multiprocessing.connection import AuthenticationError, Client

    ready, key = tmp_path / "ready.json", secrets.token_bytes(32)
    env = {**os.environ, "TETHER_VLLM_AUTHKEY": key.hex(), "FAKE_VLLM_HANDSHAKE_S": "1"}
    with started([*FAKE, "--model", str(model_dir), "--ready-file", str(ready)], env=env,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as p:
        while not ready.exists() and p.poll() is None:  # no deadline: pytest-timeout is the safety net
            time.sleep(0.05)
        address = ("127.0.0.1", json.loads(ready.read_text())["port"])
        with pytest.raises(AuthenticationError):
            Client(address, authkey=secrets.token_bytes(32))
        replies = []

        def real_client():
            with Client(address, authkey=key) as conn:
                conn.send({"op": "info"})
                replies.append(conn.recv())

        with socket.create_connection(address):  # connects first, never answers the challenge
            t = threading.Thread(target=real_client, daemon=True)
            t.start()
            t.join(timeout=CHILD_TIMEOUT_S)
        assert replies and replies[0]["ok"] and replies[0]["vocab_size"] == V, "the real client was not served"
