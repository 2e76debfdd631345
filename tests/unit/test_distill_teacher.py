"""Teacher log-probs land on the student's completion positions, with or without a privileged prompt."""

from __future__ import annotations

import torch

from tether.distill.models import vocab_logprobs
from tether.distill.opd import teacher_logprobs, teacher_signals
from tether.models.tiny import TinyConfig, TinyLM
from tether.rollout import Rollout


def _model():
    torch.manual_seed(0)
    return TinyLM(TinyConfig(vocab_size=11, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=32)).eval()


def _rollout():
    tokens = torch.tensor([[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 10, 4]])
    return Rollout(tokens_BT=tokens, prompt_len_B=torch.tensor([3, 2]), completion_len_B=torch.tensor([2, 4]),
                   logp_mu_BT=torch.zeros(2, 6), version_BT=torch.zeros(2, 6, dtype=torch.long))


def test_same_context_matches_direct_forward():
    m, r = _model(), _rollout()
    lp = teacher_logprobs(m, r)
    for b in range(2):
        p, n = int(r.prompt_len_B[b]), int(r.completion_len_B[b])
        row = r.tokens_BT[b:b + 1, :p + n]
        ref = torch.log_softmax(m(row)[0].float(), -1)  # ref[t] predicts token t + 1
        for j in range(n):
            torch.testing.assert_close(lp[b, p + j], ref[p + j - 1], rtol=1e-5, atol=1e-6)
    assert (lp[~r.loss_mask_BT] == 0).all()


def test_privileged_prompt_is_realigned_to_student_positions():
    m, r = _model(), _rollout()
    prompts = [[9, 9, 9, 9, 1, 2, 3], [5]]
    lp = teacher_logprobs(m, r, prompts)
    for b in range(2):
        p, n = int(r.prompt_len_B[b]), int(r.completion_len_B[b])
        comp = r.tokens_BT[b, p:p + n].tolist()
        row = torch.tensor([prompts[b] + comp])
        ref = torch.log_softmax(m(row)[0].float(), -1)
        for j in range(n):
            torch.testing.assert_close(lp[b, p + j], ref[len(prompts[b]) + j - 1], rtol=1e-5, atol=1e-6)
    sig = teacher_signals(lp, r)
    torch.testing.assert_close(sig["logp_teacher_BT"], lp.gather(-1, r.tokens_BT[..., None])[..., 0])
    # a different context changes the teacher's distribution (the test could not pass by ignoring it)
    assert not torch.allclose(lp[r.loss_mask_BT], teacher_logprobs(m, r)[r.loss_mask_BT])


def test_vocab_logprobs_are_normalised_and_aligned():
    m, r = _model(), _rollout()
    lp = vocab_logprobs(m, r.tokens_BT, r.attention_mask_BT)
    assert lp.shape == (2, 6, 11)
    torch.testing.assert_close(lp[:, 1:].exp().sum(-1), torch.ones(2, 5), rtol=1e-5, atol=1e-5)
    assert (lp[:, 0] == 0).all()


def test_blackbox_similarity_is_one_minus_normalised_edit_distance():
    from tether.distill.blackbox import levenshtein, similarity

    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0
    assert similarity("19", "19") == 1.0
    assert similarity("19", "18") == 0.5
    assert similarity("", "") == 1.0
    assert similarity("1", "123") == 1 - 2 / 3
