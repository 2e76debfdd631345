"""Expert rows (tether.train.expert) against hand-built records and slow loop references."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from tests.engine.helpers import tiny_builtin
from tether.engine.torch_engine import TorchEngine
from tether.models.logprobs import token_logprobs
from tether.models.tokenizer import CharTokenizer
from tether.objectives.advantages import dr_grpo
from tether.rollout import Rollout, SamplingParams
from tether.tasks.arithmetic import ArithmeticTask
from tether.tasks.base import Example
from tether.train.config import TrainConfig
from tether.train.expert import (
    ExpertRows,
    NoExpertRows,
    append_rows,
    expert_baseline,
    expert_behaviour,
    expert_rollout,
    on_policy_rows,
)
from tether.train.setup import Policy

pytestmark = pytest.mark.unit

TOK = CharTokenizer()
V, EOS, PAD = TOK.vocab_size, TOK.eos_id, TOK.pad_id
G, MAX_NEW = 3, 6
EXAMPLES = [Example("12+7=", "19", "19"), Example("3*4=", "12", "wrong!!!"), Example("100-1=", "99", "99")]


def sampled(top_k=None, seed=0, examples=EXAMPLES):
    model = tiny_builtin(seed=0, vocab_size=V)
    engine = TorchEngine(model, eos_id=TOK.eos_ids, pad_id=PAD, copy=True)
    prompts = [TOK.encode(ex.prompt) for ex in examples for _ in range(G)]
    group_B = torch.arange(len(examples)).repeat_interleave(G)
    params = SamplingParams(temperature=1.3, top_k=top_k, max_new_tokens=MAX_NEW)
    return model, engine, engine.generate(prompts, params, seed=seed, group_B=group_B)


@pytest.mark.parametrize("top_k", [None, 5])
def test_expert_rows_are_prompt_then_solution_then_eos_cut_at_the_limit(top_k):
    _, _, rollout = sampled(top_k)
    ex_rollout = expert_rollout(rollout, EXAMPLES, TOK, max_new_tokens=MAX_NEW, pad_id=PAD, vocab_size=V)
    want = [TOK.encode("12+7=") + TOK.encode("19") + [EOS],
            TOK.encode("3*4=") + TOK.encode("wrong!"),  # 8 chars + EOS > 6: cut, unfinished
            TOK.encode("100-1=") + TOK.encode("99") + [EOS]]
    assert ex_rollout.tokens_BT.shape == (3, max(len(w) for w in want))
    for b, w in enumerate(want):
        assert ex_rollout.tokens_BT[b, :len(w)].tolist() == w
        assert (ex_rollout.tokens_BT[b, len(w):] == PAD).all()
    assert ex_rollout.prompt_len_B.tolist() == [5, 4, 6]
    assert ex_rollout.completion_len_B.tolist() == [3, 6, 3]
    assert ex_rollout.finished_B.tolist() == [True, False, True]
    assert ex_rollout.group_B.tolist() == [0, 1, 2]
    mask = ex_rollout.loss_mask_BT
    assert mask[0].nonzero().flatten().tolist() == [5, 6, 7]  # the solution tokens and EOS, nothing else
    assert (ex_rollout.version_BT == -1).all() and (ex_rollout.logp_mu_BT == 0).all()
    if top_k is None:
        assert ex_rollout.kept_count_BT is None
    else:  # the full vocabulary: the expert did not draw from pi's top-k
        assert (ex_rollout.kept_count_BT == V).all()
    assert ex_rollout.sampling == rollout.sampling


def test_expert_prompt_is_copied_from_the_group_and_missing_solutions_are_refused():
    _, _, rollout = sampled()
    # a group whose sampled rows carry another prompt (e.g. a chat template): the expert row copies them
    tokens = rollout.tokens_BT.clone()
    tokens[G:2 * G, 0] = TOK.encode("9")[0]
    ex_rollout = expert_rollout(replace(rollout, tokens_BT=tokens), EXAMPLES, TOK, max_new_tokens=MAX_NEW,
                                pad_id=PAD, vocab_size=V)
    assert ex_rollout.tokens_BT[1, :4].tolist() == TOK.encode("9*4=")
    with pytest.raises(ValueError, match="example 1 .* has no expert solution"):
        expert_rollout(rollout, [EXAMPLES[0], Example("3*4=", "12"), EXAMPLES[2]], TOK, max_new_tokens=MAX_NEW,
                       pad_id=PAD, vocab_size=V)


def test_appended_rows_join_their_groups_and_keep_the_sampled_rows():
    _, _, rollout = sampled(top_k=5)
    ex_rollout = expert_rollout(rollout, EXAMPLES, TOK, max_new_tokens=MAX_NEW, pad_id=PAD, vocab_size=V)
    both, expert_B = append_rows(rollout, ex_rollout, pad_id=PAD, vocab_size=V)
    B = rollout.batch_size
    assert both.batch_size == B + 3
    assert expert_B.tolist() == [False] * B + [True] * 3
    assert both.group_B.tolist() == rollout.group_B.tolist() + [0, 1, 2]
    T = rollout.tokens_BT.shape[1]
    assert torch.equal(both.tokens_BT[:B, :T], rollout.tokens_BT)
    assert torch.equal(both.loss_mask_BT[:B, :T], rollout.loss_mask_BT) and not both.loss_mask_BT[:B, T:].any()
    assert torch.equal(both.logp_mu_BT[:B, :T], rollout.logp_mu_BT)
    assert torch.equal(both.tokens_BT[B:, :ex_rollout.tokens_BT.shape[1]], ex_rollout.tokens_BT)


def test_expert_tokens_are_teacher_forced_through_the_policy():
    """The loop's recompute on the appended rows is log pi(e_k | x, e_<k) under the sampling temperature."""
    model, _, rollout = sampled(top_k=5)
    ex_rollout = expert_rollout(rollout, EXAMPLES, TOK, max_new_tokens=MAX_NEW, pad_id=PAD, vocab_size=V)
    both, expert_B = append_rows(rollout, ex_rollout, pad_id=PAD, vocab_size=V)
    with torch.no_grad():
        logp_BT, _ = token_logprobs(model, both, replay_truncation=True)
        for b in range(3):
            row = both.batch_size - 3 + b
            p, c = int(both.prompt_len_B[row]), int(both.completion_len_B[row])
            ids = both.tokens_BT[row, :p + c]
            logits = model(ids[None])[0].float() / 1.3
            for t in range(p, p + c):  # one position at a time, the whole vocabulary (no top-k)
                want = torch.log_softmax(logits[t - 1], -1)[ids[t]]
                assert abs(float(logp_BT[row, t]) - float(want)) < 1e-5


def ref_baseline(logp_old, prompt_len, comp_len, group, expert):
    B, T = logp_old.shape
    out = torch.zeros_like(logp_old)
    for i in range(B):
        experts = [e for e in range(B) if expert[e] and group[e] == group[i]]
        if not experts:
            continue
        e = experts[0]
        for t in range(T):
            k = t - prompt_len[i]
            if 0 <= k < comp_len[i] and k < comp_len[e]:
                out[i, t] = logp_old[e, prompt_len[e] + k]
    return out


def test_expert_baseline_matches_a_loop_reference():
    g = torch.Generator().manual_seed(3)
    prompt_len = torch.tensor([2, 3, 2, 1, 3, 2, 3, 4])
    comp_len = torch.tensor([4, 1, 0, 5, 2, 3, 2, 3])
    group = torch.tensor([1, 0, 1, 2, 0, 1, 0, 7])  # any order; group 2 and 7 have no expert row
    expert = torch.tensor([False, False, False, False, False, True, True, False])
    T = 8
    rollout = Rollout(tokens_BT=torch.zeros(8, T, dtype=torch.long), prompt_len_B=prompt_len,
                      completion_len_B=comp_len, logp_mu_BT=torch.zeros(8, T), version_BT=torch.zeros(8, T),
                      group_B=group)
    logp_old = -torch.rand(8, T, generator=g, dtype=torch.float64) * 3 * rollout.loss_mask_BT
    got = expert_baseline(logp_old, rollout, expert)
    want = ref_baseline(logp_old, prompt_len.tolist(), comp_len.tolist(), group.tolist(), expert.tolist())
    assert torch.equal(got, want)
    assert got[0, 2:2 + 3].ne(0).all() and got[0, 5] == 0  # row 0 (4 tokens) gets its expert's 3
    assert (got[3] == 0).all() and (got[7] == 0).all()
    assert torch.equal(got[5], logp_old[5])  # the expert row itself: its own log-probs


def test_expert_behaviour_is_the_rl_plus_proxy_on_expert_tokens_only():
    _, _, rollout = sampled()
    ex_rollout = expert_rollout(rollout, EXAMPLES, TOK, max_new_tokens=MAX_NEW, pad_id=PAD, vocab_size=V)
    both, expert_B = append_rows(rollout, ex_rollout, pad_id=PAD, vocab_size=V)
    logp_old = -torch.rand(both.tokens_BT.shape, generator=torch.Generator().manual_seed(0)) * 4
    out = expert_behaviour(logp_old, both, expert_B)
    mask = both.loss_mask_BT
    for b in range(both.batch_size):
        for t in range(both.tokens_BT.shape[1]):
            if expert_B[b] and mask[b, t]:
                want = math.log((1.0 + math.exp(float(logp_old[b, t]))) / 2.0)
                assert abs(float(out.logp_mu_BT[b, t]) - want) < 1e-6
            else:
                assert out.logp_mu_BT[b, t] == both.logp_mu_BT[b, t]


def test_on_policy_rows_drop_the_expert_rows():
    _, _, rollout = sampled()
    x = torch.arange(rollout.batch_size * 2.0).reshape(rollout.batch_size, 2)
    assert on_policy_rows(None, x, rollout) == (x, rollout)
    expert_B = torch.zeros(rollout.batch_size, dtype=torch.bool)
    expert_B[[1, 4]] = True
    x_on, r_on = on_policy_rows(expert_B, x, rollout)
    keep = [i for i in range(rollout.batch_size) if i not in (1, 4)]
    assert torch.equal(x_on, x[keep]) and torch.equal(r_on.tokens_BT, rollout.tokens_BT[keep])


def test_expert_rows_scored_by_the_task_and_their_loss_inputs():
    """ExpertRows end to end on arithmetic: a correct solution scores 1, a wrong one 0; the advantage
    with include_B = ~expert_B; the LossInputs fields are aligned with the record."""
    model, engine, rollout = sampled(top_k=5)
    cfg = TrainConfig.from_flat(prompts_per_step=3, group_size=G, max_new_tokens=MAX_NEW)
    experts = ExpertRows(cfg, ArithmeticTask(), Policy(model=model, tokenizer=TOK, engine=engine))
    rewards_B = torch.zeros(rollout.batch_size)
    rewards_B[0] = 1.0  # one correct sampled row in group 0
    both, all_rewards_B, expert_B, failed = experts.append(rollout, rewards_B, EXAMPLES)
    assert failed == 0 and all_rewards_B[-3:].tolist() == [1.0, 0.0, 1.0]
    assert torch.equal(all_rewards_B[:rollout.batch_size], rewards_B)
    assert experts.metrics["expert/reward_mean"] == pytest.approx(2 / 3)
    assert experts.metrics["expert/truncated_frac"] == pytest.approx(1 / 3)
    A_B = dr_grpo(all_rewards_B, both.group_B, ~expert_B)
    B = rollout.batch_size
    assert A_B[B].item() == pytest.approx(1.0 - 1 / 3)  # R_e - mean of the group's sampled rows
    assert A_B[0].item() == pytest.approx(1.0 - 1 / 3) and A_B[1].item() == pytest.approx(-1 / 3)
    with torch.no_grad():
        logp_old, _ = token_logprobs(model, both)
    out, inputs = experts.loss_inputs(both, logp_old, expert_B)
    assert set(inputs) == {"expert_B", "logp_expert_old_BT"} and inputs["expert_B"] is expert_B
    assert torch.equal(inputs["logp_expert_old_BT"], expert_baseline(logp_old, both, expert_B))
    assert torch.equal(out.logp_mu_BT[:B], both.logp_mu_BT[:B])  # sampled rows keep the engine's mu
    m = both.loss_mask_BT[B:]
    assert experts.metrics["expert/logp_old_mean"] == pytest.approx(float(logp_old[B:][m].mean()), rel=1e-6)


def test_no_expert_rows_leave_the_step_alone():
    _, _, rollout = sampled()
    rewards_B = torch.rand(rollout.batch_size)
    none = NoExpertRows()
    assert none.append(rollout, rewards_B, EXAMPLES) == (rollout, rewards_B, None, 0)
    assert none.loss_inputs(rollout, rewards_B, None) == (rollout, {}) and none.metrics == {}


def test_hf_chat_tokenizer_appends_the_solution_without_template_or_specials(tmp_path):
    pytest.importorskip("transformers")
    from tests.engine.hf_helpers import tiny_llama_folder
    from tether.models import hf

    _, tok = hf.load_hf(str(tiny_llama_folder(tmp_path / "chat", chat=True)))
    assert tok.chat and tok.decode(tok.encode("19")) == "<user>19\n<assistant>"  # a prompt gets the template
    ids = tok.encode_completion("19")
    assert tok.decode(ids, skip_special=False) == "19" and len(ids) == 2
