import pytest
import torch

from tests.engine.helpers import EOS, PAD, make_model, random_prompts, tiny_builtin
from tether.engine.torch_engine import TorchEngine
from tether.models.logprobs import token_logprobs
from tether.rollout import SamplingParams

pytestmark = pytest.mark.engine

KINDS = ["builtin", "llama", "qwen2", "gpt2"]


def loop_masks(rollout):
    """Reference masks from the two lengths, written with loops."""
    B, T = rollout.tokens_BT.shape
    loss = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        p, c = int(rollout.prompt_len_B[b]), int(rollout.completion_len_B[b])
        for t in range(p, p + c):
            loss[b, t] = True
    return loss


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_tokens_and_record_layout(kind):
    model = make_model(kind)
    engine = TorchEngine(model, eos_id=EOS, pad_id=PAD, copy=True, version=3)
    prompts = random_prompts(4, seed=2)
    params = SamplingParams(temperature=1.0, max_new_tokens=12)
    a = engine.generate(prompts, params, seed=11, n=2)
    b = engine.generate(prompts, params, seed=11, n=2)
    c = engine.generate(prompts, params, seed=12, n=2)
    assert torch.equal(a.tokens_BT, b.tokens_BT) and torch.equal(a.logp_mu_BT, b.logp_mu_BT)
    assert not torch.equal(a.tokens_BT, c.tokens_BT)
    assert a.group_B.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.equal(a.loss_mask_BT, loop_masks(a))
    for i, p in enumerate(prompts):
        for r in (2 * i, 2 * i + 1):
            assert a.prompt_len_B[r] == len(p) and a.tokens_BT[r, :len(p)].tolist() == p
    mask = a.loss_mask_BT
    assert (a.version_BT[mask] == 3).all() and (a.version_BT[~mask] == -1).all()
    assert (a.logp_mu_BT[~mask] == 0).all() and (a.logp_mu_BT[mask] <= 0).all()
    assert a.tokens_BT.shape[1] == int((a.prompt_len_B + a.completion_len_B).max())


@pytest.mark.parametrize("kind", KINDS)
def test_left_padding_does_not_change_a_row(kind):
    """Greedy decoding of a prompt alone equals its row in a batch with longer and shorter prompts."""
    model = make_model(kind)
    engine = TorchEngine(model, eos_id=EOS, pad_id=PAD)
    prompts = [[5, 6, 7], [9] * 11, [4], [3, 8, 12, 30, 31, 32]]
    greedy = SamplingParams(top_k=1, max_new_tokens=10)
    batch = engine.generate(prompts, greedy, seed=0)
    for i, p in enumerate(prompts):
        alone = engine.generate([p], greedy, seed=0)
        L = int(batch.prompt_len_B[i] + batch.completion_len_B[i])
        assert batch.tokens_BT[i, :L].tolist() == alone.tokens_BT[0].tolist()
        assert (batch.logp_mu_BT[batch.loss_mask_BT] == 0).all()  # top-1: probability one


def test_pad_equal_to_eos_keeps_the_real_eos():
    """Regression lock: pad id == EOS id; the generated EOS must stay inside the loss mask."""
    model = tiny_builtin(vocab_size=5, init_std=0.02)  # near-uniform over 5 ids: EOS comes often
    engine = TorchEngine(model, eos_id=EOS, pad_id=EOS)
    rollout = engine.generate([[3, 4, 3]] * 16, SamplingParams(max_new_tokens=20), seed=0)
    mask = rollout.loss_mask_BT
    assert torch.equal(mask, loop_masks(rollout))
    finished = rollout.finished_B
    for b in range(16):
        p, c = int(rollout.prompt_len_B[b]), int(rollout.completion_len_B[b])
        comp = rollout.tokens_BT[b, p:p + c].tolist()
        if finished[b]:
            assert comp[-1] == EOS and EOS not in comp[:-1]
            assert mask[b, p + c - 1] and rollout.logp_mu_BT[b, p + c - 1] < 0
        else:
            assert c == 20 and EOS not in comp
    assert finished.sum() >= 8  # P(no EOS in 20 draws) ~ 0.8**20
    lp, _ = token_logprobs(model, rollout)
    assert (lp - rollout.logp_mu_BT)[mask].abs().max() < 1e-5


def test_several_eos_ids_stop_at_the_first_of_any():
    """Instruct models list several stop ids (end-of-turn, end-of-text): a row stops at whichever
    comes first; before it, tokens are those of a run that stops on one id only (same seed)."""
    model = tiny_builtin(vocab_size=6, init_std=0.02)  # near-uniform over 6 ids
    prompts, params = [[3, 4, 3]] * 16, SamplingParams(max_new_tokens=25)
    one = TorchEngine(model, eos_id=EOS, pad_id=PAD).generate(prompts, params, seed=3)
    both = TorchEngine(model, eos_id=(EOS, 5), pad_id=PAD).generate(prompts, params, seed=3)
    ended_on_5 = 0
    for b in range(16):
        p = int(one.prompt_len_B[b])
        ref = one.tokens_BT[b, p:p + int(one.completion_len_B[b])].tolist()
        comp = both.tokens_BT[b, p:p + int(both.completion_len_B[b])].tolist()
        cut = next((i + 1 for i, t in enumerate(ref) if t in (EOS, 5)), len(ref))
        assert comp == ref[:cut]
        assert bool(both.finished_B[b]) == (cut < len(ref) or ref[-1] in (EOS, 5))
        ended_on_5 += comp[-1] == 5 and bool(both.finished_B[b])
    assert ended_on_5 >= 2  # the second id really stops rows
    assert torch.equal(both.loss_mask_BT, loop_masks(both))
    with pytest.raises(ValueError, match="at least one"):
        TorchEngine(model, eos_id=())


def test_stop_strings_on_ids():
    model = tiny_builtin(vocab_size=5, init_std=0.02)

    def encode(text):
        return [{"a": 3, "b": 4}[ch] for ch in text]

    engine = TorchEngine(model, eos_id=EOS, pad_id=PAD, encode=encode)
    params = SamplingParams(max_new_tokens=30, stop=("ab",))
    rollout = engine.generate([[3]] * 16, params, seed=1)
    stopped = 0
    for b in range(16):
        p, c = int(rollout.prompt_len_B[b]), int(rollout.completion_len_B[b])
        comp = rollout.tokens_BT[b, p:p + c].tolist()
        hits = [i for i in range(1, len(comp)) if comp[i - 1:i + 1] == [3, 4]]
        if rollout.finished_B[b] and comp[-1] != EOS:
            assert hits == [len(comp) - 1]
            stopped += 1
        else:
            assert hits == []
    assert stopped >= 2
    with pytest.raises(ValueError, match="encode"):
        TorchEngine(model, eos_id=EOS).generate([[3]], params, seed=0)


def test_load_weights_in_place_and_version():
    trainer_model = tiny_builtin(seed=0)
    engine = TorchEngine(trainer_model, eos_id=EOS, pad_id=PAD, copy=True)
    engine_params = [p.data_ptr() for p in engine.model.parameters()]
    prompts = random_prompts(3)
    params = SamplingParams(max_new_tokens=8)
    before = engine.generate(prompts, params, seed=0)
    with torch.no_grad():
        for p in trainer_model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    same = engine.generate(prompts, params, seed=0)
    assert torch.equal(before.logp_mu_BT, same.logp_mu_BT)  # the engine owns its copy
    engine.load_weights(trainer_model.state_dict(), version=7)
    assert [p.data_ptr() for p in engine.model.parameters()] == engine_params
    after = engine.generate(prompts, params, seed=0)
    mask = after.loss_mask_BT
    assert (after.version_BT[mask] == 7).all()
    lp, _ = token_logprobs(trainer_model, after)
    assert (lp - after.logp_mu_BT)[mask].abs().max() < 1e-5
    with pytest.raises(KeyError, match="missing"):
        engine.load_weights({}, version=8)


def test_low_precision_engine():
    model = tiny_builtin(seed=0)
    engine = TorchEngine(model, eos_id=EOS, pad_id=PAD, copy=True, dtype=torch.bfloat16)
    assert next(engine.model.parameters()).dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32
    rollout = engine.generate(random_prompts(4), SamplingParams(max_new_tokens=10, top_p=0.9), seed=0)
    mask = rollout.loss_mask_BT
    assert rollout.logp_mu_BT.dtype == torch.float32 and torch.isfinite(rollout.logp_mu_BT).all()
    lp, _ = token_logprobs(model, rollout)
    diff = (lp - rollout.logp_mu_BT)[mask].abs()
    assert diff.max() > 0  # bf16 sampling is a different policy: that is the mismatch tether measures
    assert diff.mean() < 0.5
    engine.load_weights(model.state_dict(), version=1)  # fp32 weights are cast into the bf16 copy


def test_bad_inputs():
    engine = TorchEngine(tiny_builtin(), eos_id=EOS)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[3], []], SamplingParams(), seed=0)
    with pytest.raises(ValueError, match="maximum length"):
        engine.generate([[3] * 120], SamplingParams(max_new_tokens=20), seed=0)
