"""One suite of contract tests run against every rollout engine: what ``tether.engine.base.Engine``
promises the loops (masks from positions, log mu, versions, seeds, weight loading, truncation, close).

Engines: ``TorchEngine`` on the built-in model and on a tiny Llama, ``PrecisionEngine`` (bf16 split,
bf16 unified, int8), and the ``VLLMEngine`` client against the fake server (the real serve loop with a
predictable "model": tests/engine/fake_vllm_server.py). Every engine is built with ``pad_id`` equal to
its EOS id, so a mask taken from token identity would hide the real EOS and fail the mask test.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.engine.helpers import EOS, VOCAB, random_prompts, tiny_builtin, tiny_hf
from tether.engine.base import Engine
from tether.rollout import Rollout, SamplingParams

pytestmark = pytest.mark.engine

FAKE_SERVER = [sys.executable, str(Path(__file__).with_name("fake_vllm_server.py"))]
VERSION = 3  # the version every case loads first
PARAMS = SamplingParams(temperature=1.0, max_new_tokens=16)
SEED = 7  # the fake server stops 6 of its 12 rows on EOS with this seed


@dataclass
class Case:
    engine: Engine
    state: Callable[[float], dict[str, torch.Tensor]]
    """Weights to load: the case's initial weights plus noise of this scale (0: the initial weights)."""
    outputs_follow_weights: bool
    """Reloading earlier weights gives the earlier rollout back (the fake server's log-probs count pushes instead)."""


def perturbed(model: torch.nn.Module) -> Callable[[float], dict[str, torch.Tensor]]:
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def state(scale: float) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(1)
        return {k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
                for k, v in base.items()}

    return state


def torch_case(model, **kw) -> Case:
    from tether.engine.torch_engine import TorchEngine

    return Case(TorchEngine(model, eos_id=EOS, copy=True, **kw), perturbed(model), True)


def precision_case(precision: str, unified: bool) -> Case:
    from tether.engine.precision import PrecisionEngine

    model = tiny_builtin(0)
    return Case(PrecisionEngine(model, precision=precision, unified=unified, eos_id=EOS, copy=True),
                perturbed(model), True)


def vllm_fake_case(tmp_path: Path) -> Case:
    pytest.importorskip("safetensors")  # weights travel to the server as a safetensors file
    from tether.engine.vllm_engine import VLLMEngine

    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": VOCAB}))
    engine = VLLMEngine(tmp_path, eos_id=EOS, vocab_size=VOCAB, command=FAKE_SERVER)
    return Case(engine, perturbed(tiny_builtin(0)), False)


CASES = {
    "torch-builtin": lambda tmp: torch_case(tiny_builtin(0)),
    "torch-llama": lambda tmp: torch_case(tiny_hf("llama")),
    "precision-bf16": lambda tmp: precision_case("bf16", unified=False),
    "precision-bf16-unified": lambda tmp: precision_case("bf16", unified=True),
    "precision-int8": lambda tmp: precision_case("int8", unified=False),
    "vllm-fake-server": vllm_fake_case,
}


@pytest.fixture(scope="module", params=list(CASES))
def built(request, tmp_path_factory):
    """One engine per case for the whole module (pytest groups the tests by case)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared: two threads fighting over it make these tests 5x slower
    case = None
    try:
        case = CASES[request.param](tmp_path_factory.mktemp(request.param))
        yield case
    finally:
        if case is not None:
            case.engine.close()  # a server process never outlives the module
        torch.set_num_threads(threads)


@pytest.fixture
def case(built):
    """The case's engine at its initial weights, version ``VERSION``."""
    built.engine.load_weights(built.state(0.0), version=VERSION)
    return built


def prompts() -> list[list[int]]:
    return random_prompts(6, seed=1)


def sample(engine: Engine, params: SamplingParams = PARAMS, seed: int = SEED) -> Rollout:
    return engine.generate(prompts(), params, seed=seed, n=2)


def loop_masks(rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss mask, attention mask) from the two lengths, written as loops."""
    B, T = rollout.tokens_BT.shape
    loss, attn = torch.zeros(B, T, dtype=torch.bool), torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        p, c = int(rollout.prompt_len_B[b]), int(rollout.completion_len_B[b])
        attn[b, :p + c] = True
        loss[b, p:p + c] = True
    return loss, attn


def completions(rollout: Rollout) -> list[list[int]]:
    return [rollout.tokens_BT[b, p:p + c].tolist()
            for b, (p, c) in enumerate(zip(rollout.prompt_len_B.tolist(), rollout.completion_len_B.tolist()))]


def same_rollout(a: Rollout, b: Rollout) -> bool:
    fields = ("tokens_BT", "prompt_len_B", "completion_len_B", "logp_mu_BT", "version_BT", "group_B", "finished_B")
    if (a.kept_count_BT is None) != (b.kept_count_BT is None):
        return False
    kept = a.kept_count_BT is None or torch.equal(a.kept_count_BT, b.kept_count_BT)
    return kept and all(torch.equal(getattr(a, f), getattr(b, f)) for f in fields)


def test_is_an_engine_with_typed_members(case):
    e = case.engine
    assert isinstance(e, Engine)
    assert type(e.version) is int and e.version == VERSION
    assert type(e.pad_id) is int and e.pad_id == EOS  # built without pad_id: the first EOS id
    assert type(e.vocab_size) is int and e.vocab_size == VOCAB
    assert isinstance(e.eos_ids, tuple) and e.eos_ids == (EOS,)


def test_an_object_missing_a_member_is_not_an_engine():
    class NoClose:
        version, pad_id, vocab_size, eos_ids = 0, 0, 1, (0,)

        def generate(self, prompts, params, *, seed, group_B=None, n=1): ...

        def load_weights(self, state_dict, version): ...

    class Full(NoClose):
        def close(self): ...

    assert isinstance(Full(), Engine)
    assert not isinstance(NoClose(), Engine)


def test_rows_are_prompt_major_and_masks_come_from_positions(case):
    r = sample(case.engine)
    ps = prompts()
    assert isinstance(r, Rollout) and r.batch_size == 2 * len(ps)
    assert r.group_B.tolist() == [i // 2 for i in range(2 * len(ps))]
    loss, attn = loop_masks(r)
    assert torch.equal(r.loss_mask_BT, loss) and torch.equal(r.attention_mask_BT, attn)
    assert r.tokens_BT.shape[1] == int((r.prompt_len_B + r.completion_len_B).max())
    for b in range(r.batch_size):
        p, c = int(r.prompt_len_B[b]), int(r.completion_len_B[b])
        assert r.tokens_BT[b, :p].tolist() == ps[b // 2]
        assert (r.tokens_BT[b, p + c:] == case.engine.pad_id).all()
        comp = completions(r)[b]
        if bool(r.finished_B[b]):  # stopped on its first EOS, which stays in the completion (pad_id == EOS)
            assert comp[-1] == EOS and EOS not in comp[:-1]
        else:
            assert c == PARAMS.max_new_tokens and EOS not in comp
    assert r.finished_B.any() and not r.finished_B.all()  # both kinds of row are checked above


def test_logp_mu_finite_on_completion_and_zero_elsewhere(case):
    r = sample(case.engine)
    mask = r.loss_mask_BT
    assert torch.isfinite(r.logp_mu_BT[mask]).all() and (r.logp_mu_BT[mask] <= 0).all()
    assert (r.logp_mu_BT[mask] < 0).any()  # temperature 1, no truncation: not every token has probability one
    assert (r.logp_mu_BT[~mask] == 0).all()
    assert r.kept_count_BT is None  # nothing truncated, nothing recorded


def test_versions_are_the_loaded_version_on_completion_tokens(case):
    r = sample(case.engine)
    mask = r.loss_mask_BT
    assert (r.version_BT[mask] == VERSION).all() and (r.version_BT[~mask] == -1).all()


def test_same_seed_same_rollout_other_seed_other_tokens(case):
    a, b = sample(case.engine), sample(case.engine)
    assert same_rollout(a, b)
    assert completions(sample(case.engine, seed=SEED + 1)) != completions(a)


def test_group_ids_are_passed_through(case):
    group_B = torch.tensor([7, 7, 9, 9, 4, 4, 1, 1, 8, 8, 2, 2])
    r = case.engine.generate(prompts(), PARAMS, seed=SEED, n=2, group_B=group_B)
    assert r.group_B.tolist() == group_B.tolist()


def test_load_weights_sets_the_version_and_changes_the_outputs(case):
    e = case.engine
    before = sample(e)
    e.load_weights(case.state(0.2), version=VERSION + 4)
    assert e.version == VERSION + 4
    after = sample(e)
    assert (after.version_BT[after.loss_mask_BT] == VERSION + 4).all()
    assert not (torch.equal(before.tokens_BT, after.tokens_BT) and torch.equal(before.logp_mu_BT, after.logp_mu_BT))
    e.load_weights(case.state(0.0), version=VERSION + 5)
    again = sample(e)
    assert (again.version_BT[again.loss_mask_BT] == VERSION + 5).all()
    if case.outputs_follow_weights:  # the weights are replaced, not accumulated
        assert torch.equal(again.tokens_BT, before.tokens_BT) and torch.equal(again.logp_mu_BT, before.logp_mu_BT)


def test_top_k_records_the_truncated_support(case):
    r = sample(case.engine, SamplingParams(temperature=1.0, top_k=5, max_new_tokens=16))
    mask = r.loss_mask_BT
    assert r.kept_count_BT is not None and r.kept_count_BT.shape == r.tokens_BT.shape
    assert (r.kept_count_BT[mask] == 5).all()
    assert torch.isfinite(r.logp_mu_BT[mask]).all() and (r.logp_mu_BT[~mask] == 0).all()


def test_invalid_requests_are_refused_before_sampling(case):
    with pytest.raises(ValueError, match="n must be >= 1"):
        case.engine.generate(prompts(), PARAMS, seed=0, n=0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        case.engine.generate([[4], []], PARAMS, seed=0)
    with pytest.raises(ValueError, match="no prompts"):
        case.engine.generate([], PARAMS, seed=0)


@pytest.mark.parametrize("name", list(CASES))
def test_close_is_idempotent(name, tmp_path):
    engine = CASES[name](tmp_path).engine
    try:
        engine.close()
    finally:
        engine.close()
