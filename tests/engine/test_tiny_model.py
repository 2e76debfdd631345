import pytest
import torch

from tether.models.tiny import TinyConfig, TinyLM, save_hf
from tether.models.tokenizer import CharTokenizer

pytestmark = pytest.mark.engine


def model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(d_model=64, n_layers=2, n_heads=4, d_ff=128, max_len=64, init_std=0.2)
    cfg.update(kw)
    return TinyLM(TinyConfig(**cfg)).eval()


def test_default_size_and_validation():
    m = TinyLM(TinyConfig())
    assert 1_000_000 <= m.num_params() <= 3_000_000
    with pytest.raises(ValueError, match="n_heads"):
        TinyConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="TinyConfig.n_layers"):
        TinyConfig(n_layers=0)
    with pytest.raises(ValueError, match="even"):
        TinyConfig(d_model=12, n_heads=4)
    with pytest.raises(ValueError, match="max_len"):
        model()(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("tied", [True, False])
def test_save_hf_roundtrip_same_logits(tmp_path, tied):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    m = model(tie_embeddings=tied)
    save_hf(m, CharTokenizer(), tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert hf.config.tie_word_embeddings == tied
    tokens = torch.randint(0, 99, (3, 50))
    with torch.no_grad():
        ours, theirs = m(tokens), hf(tokens).logits
    assert (ours - theirs).abs().max() < 1e-5
    assert ours.abs().max() > 0.1  # not a degenerate comparison
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "12 + 34=\n~x"
    ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    assert ids == CharTokenizer().encode(text) and hf_tok.decode(ids) == text
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id, hf_tok.bos_token_id) == (2, 0, 1)


def test_kv_cache_and_left_padding_match_full_forward():
    m = model()
    tokens = torch.randint(3, 99, (2, 20))
    with torch.no_grad():
        full = m(tokens)
        cache = m.new_cache(2, 32)
        parts = [m(tokens[:, :9], cache=cache)] + [m(tokens[:, t:t + 1], cache=cache) for t in range(9, 20)]
        assert (torch.cat(parts, 1) - full).abs().max() < 1e-5
        # row 1 left-padded by 4: same logits on its real tokens as unpadded
        padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), tokens[1:, :16]], 1)
        valid = torch.arange(20)[None] >= 4
        pos = (valid.cumsum(-1) - 1).clamp(min=0)
        cache = m.new_cache(1, 24)
        out = m(padded, positions_BT=pos, key_valid_BT=valid, cache=cache)
        assert torch.isfinite(out).all()
        assert (out[0, 4:] - full[1, :16]).abs().max() < 1e-5


def test_fused_inference_path_tracks_updates_and_copies():
    import copy

    m = model()
    tokens = torch.randint(3, 99, (2, 10))
    with torch.no_grad():
        ref = m(tokens)
        m.fuse_projections_()
        assert (m(tokens) - ref).abs().max() < 1e-5
        assert list(m.state_dict()) == list(model().state_dict())
        other = model(seed=1)
        m.load_state_dict(other.state_dict())
        assert (m(tokens) - other(tokens)).abs().max() < 1e-5
        dup = copy.deepcopy(m)  # sharing lost: the unfused path must be used, and fusing again works
        for p in dup.parameters():
            p.mul_(0.5)
        halved = dup(tokens)
        dup.fuse_projections_()
        assert (dup(tokens) - halved).abs().max() < 1e-5
        assert (halved - m(tokens)).abs().max() > 1e-3
    m.train()
    m(tokens).sum().backward()  # gradients on: the unfused path, every projection gets a gradient
    assert m.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert m.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


def test_decode_step_matches_cached_forward_with_and_without_padding():
    """The lean one-token path of the engine computes the same logits as the general cached forward
    (the two differ only in kernel choice: fused RMSNorm, roll-based RoPE, addmm residuals)."""
    m = model()
    m.fuse_projections_()
    assert m.is_fused()
    tokens = torch.randint(3, 99, (3, 14))
    valid = torch.ones(3, 8, dtype=torch.bool)
    valid[1, :3] = False  # row 1 left-padded by 3, row 2 by 5
    valid[2, :5] = False
    pos = (valid.cumsum(-1) - 1).clamp(min=0)
    for key_valid in (None, valid):
        with torch.inference_mode():
            ref_cache, fast_cache = m.new_cache(3, 20), m.new_cache(3, 20)
            p = pos if key_valid is not None else torch.arange(8).expand(3, 8)
            m(tokens[:, :8], positions_BT=p, key_valid_BT=key_valid, cache=ref_cache)
            m(tokens[:, :8], positions_BT=p, key_valid_BT=key_valid, cache=fast_cache)
            for t in range(8, 14):
                step_pos = p[:, -1] + (t - 7)
                ref = m(tokens[:, t:t + 1], positions_BT=step_pos[:, None], cache=ref_cache)[:, 0]
                fast = m.decode_step(tokens[:, t], step_pos, fast_cache)
                assert fast.shape == (3, m.config.vocab_size) and fast.dtype == torch.float32
                assert (fast - ref).abs().max() < 1e-5, (key_valid is not None, t)
            assert fast_cache.length == ref_cache.length == 14
            assert torch.allclose(fast_cache.k[:, :, :, :14], ref_cache.k[:, :, :, :14], atol=1e-5)
            # a changed token changes the logits: the comparison above is not vacuous
            other = m.decode_step((tokens[:, 13] + 1) % 99, step_pos + 1, fast_cache)
            assert (other - fast).abs().max() > 1e-3


def test_decode_step_needs_fused_weights():
    import copy

    m = model()
    assert not m.is_fused()
    m.fuse_projections_()
    dup = copy.deepcopy(m)  # the copy's fused tensors no longer share storage with its parameters
    assert m.is_fused() and not dup.is_fused()
