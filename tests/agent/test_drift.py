"""The tokenisation-drift meter: 1 and a positive log-prob gap on a think-stripping template, 0 and gap
exactly 0 on tether's token-native rows; per-source / per-turn mismatch equals the meter on the subset."""

from __future__ import annotations

import random

import pytest
import torch

from tests.agent.chat_tokenizers import BRACKETS, THINK_STRIP, char_chat
from tether.agent.drift import (
    Transcript,
    drift_metrics,
    logp_gaps,
    mismatch_by_source,
    mismatch_by_turn,
    model_logprob_fn,
    transcripts,
)
from tether.agent.render import ChatRenderer
from tether.meter.stats import ratio_stats
from tether.models.builtin import tiny_model
from tether.rollout import Rollout, Source

pytestmark = pytest.mark.unit


def _render_fn(hf):
    def render(messages, gen):
        out = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)
    return render


def _sampled(hf, turns: int, rng: random.Random, think: bool = True) -> Transcript:
    """A token-native row built like the episode runner (first, action, reply, ...), through ChatRenderer."""
    r = ChatRenderer(hf)
    messages = [{"role": "user", "content": f"q{rng.randrange(9)}"}]
    tokens, spans = r.first(messages[0]["content"]), []
    for k in range(turns):
        text = (f"<think>hmm {rng.randrange(99)}</think>" if think else "") + f"a{k}"
        a = hf(text, add_special_tokens=False)["input_ids"] + [hf.eos_token_id]
        spans.append((len(tokens), len(tokens) + len(a)))
        tokens += a
        messages.append({"role": "assistant", "content": r.action_text(a)})
        if k < turns - 1:
            reply = f"r{rng.randrange(9)}"
            messages.append({"role": "user", "content": reply})
            tokens += r.reply(reply, "user")
    return Transcript(tokens, spans, messages)


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    return char_chat(d / "plain", BRACKETS), char_chat(d / "think", THINK_STRIP)


@pytest.fixture(scope="module")
def logprob_fn():
    model, tok = tiny_model(0)
    return model_logprob_fn(model, tok.pad_id)


def test_think_stripping_template_drifts_every_turn_with_a_positive_gap(toks, logprob_fn):
    plain, think = toks
    rng = random.Random(0)
    eps = [_sampled(think, n, rng) for n in (2, 3, 4)]
    m = drift_metrics(eps, _render_fn(think), logprob_fn)
    assert m["agent/retokenize_mismatch_frac"] == 1.0
    assert m["agent/retokenize_context_mismatch_frac"] == pytest.approx(6 / 9)  # turn 0's context is the prompt
    assert m["agent/retokenize_logp_gap"] > 0 and m["agent/retokenize_turns"] == 9
    one = drift_metrics([_sampled(think, 1, rng)], _render_fn(think), logprob_fn)
    assert one["agent/retokenize_mismatch_frac"] == 0.0 and one["agent/retokenize_logp_gap"] == 0.0


def test_token_native_rows_with_an_append_only_template_give_zero(toks, logprob_fn):
    plain, _ = toks
    rng = random.Random(1)
    eps = [_sampled(plain, n, rng) for n in (1, 2, 4)]
    m = drift_metrics(eps, _render_fn(plain), logprob_fn)
    assert m["agent/retokenize_mismatch_frac"] == 0.0 and m["agent/retokenize_context_mismatch_frac"] == 0.0
    assert m["agent/retokenize_logp_gap"] == 0.0 and m["agent/retokenize_logp_gap_max"] == 0.0
    # tether's own path: the render is the row itself (identity by construction)
    (t,) = [_sampled(plain, 3, rng)]
    idx = [i for i, x in enumerate(t.messages) if x["role"] == "assistant"]
    prefixes = {len(t.messages[:i]): t.tokens[:t.action_spans[k][0]] for k, i in enumerate(idx)}

    def identity(messages, gen):
        return prefixes[len(messages)] if gen else t.tokens
    m = drift_metrics([t], identity, logprob_fn)
    assert m["agent/retokenize_mismatch_frac"] == 0.0 and m["agent/retokenize_logp_gap"] == 0.0


def test_logp_gap_equals_a_loop_reference(toks):
    _, think = toks
    model, tok = tiny_model(3)
    fn = model_logprob_fn(model, tok.pad_id)
    t = _sampled(think, 3, random.Random(2))
    render = _render_fn(think)
    gaps = logp_gaps([t], render, fn)

    def seq_logp(row, s, e):  # one row at a time, token by token
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([row])).double(), -1)[0]
        return sum(float(lp[p - 1, row[p]]) for p in range(s, e))
    idx = [i for i, m in enumerate(t.messages) if m["role"] == "assistant"]
    for k, (s, e) in enumerate(t.action_spans):
        c = render(t.messages[:idx[k]], True)
        same = c == t.tokens[:s]  # an undrifted context is exactly 0 by definition (no model call)
        ref = 0.0 if same else abs(seq_logp(t.tokens, s, e) - seq_logp(c + t.tokens[s:e], len(c), len(c) + e - s))
        assert gaps[k] == pytest.approx(ref, rel=1e-5, abs=1e-5)  # float32 model: batch padding noise
    assert gaps[0] == 0.0 and gaps[1] > 0


def _rollout(seed=0, B=3, T=10):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, 6, (B, T), generator=g).to(torch.int8)
    turn = torch.randint(0, 3, (B, T), generator=g)
    r = Rollout(tokens_BT=torch.zeros(B, T, dtype=torch.long), prompt_len_B=torch.zeros(B, dtype=torch.long),
                completion_len_B=torch.full((B,), T), logp_mu_BT=-torch.rand(B, T, generator=g),
                version_BT=torch.zeros(B, T, dtype=torch.long), source_BT=src, turn_BT=turn)
    return r, r.logp_mu_BT + 0.3 * torch.randn(B, T, generator=g)


def test_per_source_and_per_turn_are_the_meter_on_the_subset():
    r, logp = _rollout()
    by_src, by_turn = mismatch_by_source(r, logp, r.logp_mu_BT), mismatch_by_turn(r, logp, r.logp_mu_BT)
    z = logp - r.logp_mu_BT
    for s in (Source.POLICY, Source.TEACHER, Source.CACHE):
        ref = ratio_stats(z, r.source_BT == s, prefix="x")
        assert torch.equal(by_src[f"agent/mismatch/{s.name.lower()}/ess_token"], ref["x/ess_token"])
        assert float(by_src[f"agent/mismatch/{s.name.lower()}/n_tokens"]) == int((r.source_BT == s).sum())
    for k in range(3):
        m = (r.source_BT == Source.POLICY) & (r.turn_BT == k)
        n = int(m.sum())
        assert float(by_turn[f"agent/turn{k}/n_tokens"]) == n
        ref_abs = sum(abs(float(z[b, t])) for b in range(3) for t in range(10) if m[b, t]) / max(n, 1)
        assert float(by_turn[f"agent/turn{k}/abs_logr_mean"]) == pytest.approx(ref_abs, rel=1e-6)
    assert "agent/turn3/n_tokens" not in by_turn


def test_transcripts_from_an_episode_batch():
    class Batch:
        rollout = Rollout(tokens_BT=torch.tensor([[5, 6, 7, 0], [5, 6, 0, 0]]), prompt_len_B=torch.tensor([1, 1]),
                          completion_len_B=torch.tensor([2, 1]), logp_mu_BT=torch.zeros(2, 4),
                          version_BT=torch.zeros(2, 4, dtype=torch.long))
        action_spans = [[(1, 3)], [(1, 2)]]
        messages = [[{"role": "user", "content": "x"}], None]
    (t,) = transcripts(Batch())
    assert t.tokens == [5, 6, 7] and t.action_spans == [(1, 3)]


@pytest.mark.engine
def test_episode_runner_rows_through_the_text_adapter_have_no_drift():
    """Rows the episode runner samples with a text environment (tiny model, plain renderer) re-render, in the
    plain format (user text; action text + EOS; reply text), to exactly themselves: drift 0, gap 0. The
    model's head gets an EOS bias so that actions end with EOS (a cut action has no EOS to re-render)."""
    from tests.agent.toy_envs import Copy
    from tether.agent.episodes import run_episodes
    from tether.agent.render import PlainRenderer, TextEnvAdapter
    from tether.engine.torch_engine import TorchEngine
    from tether.rollout import SamplingParams

    model, tok = tiny_model(0)
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[tok.eos_id] = 4.0
    model.lm_head = head
    engine = TorchEngine(model, eos_id=tok.eos_id, pad_id=tok.pad_id, copy=True)
    envs = [TextEnvAdapter(Copy(), PlainRenderer(tok)) for _ in range(6)]
    batch = run_episodes(engine, envs, list(range(6)), SamplingParams(max_new_tokens=48), group_B=torch.arange(6),
                         seed_fn=lambda k, c: k, max_turns=2, max_episode_tokens=400)

    def plain(messages, gen):
        return [i for m in messages for i in tok.encode(m["content"]) + ([tok.eos_id] if m["role"] == "assistant"
                                                                          else [])]
    ts = [t for t in transcripts(batch) if all(t.tokens[e - 1] == tok.eos_id for _, e in t.action_spans)]
    assert sum(len(t.action_spans) >= 2 for t in ts) >= 2
    m = drift_metrics(ts, plain, model_logprob_fn(model, tok.pad_id))
    assert m["agent/retokenize_mismatch_frac"] == 0.0 and m["agent/retokenize_logp_gap"] == 0.0
    stripped = drift_metrics(ts, lambda ms, g: plain(ms, g)[1:] if len(ms) > 1 else plain(ms, g),
                             model_logprob_fn(model, tok.pad_id))
    assert stripped["agent/retokenize_mismatch_frac"] == 1.0 and stripped["agent/retokenize_logp_gap"] > 0
