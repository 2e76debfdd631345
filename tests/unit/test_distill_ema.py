"""EMA self-teacher (OPSD ``opsd_teacher = ema``, CaOPD): the update equation against a reference loop,
no gradients into the teacher, the wiring into OPSD / CaOPD batches, and the config field."""

from __future__ import annotations

import copy

import pytest
import torch

from tether.distill.base import Context
from tether.distill.config import Algorithm, DistillConfig, OPSDTeacher
from tether.distill.ema import ema_update, frozen_copy
from tether.engine.torch_engine import TorchEngine
from tether.models.tiny import TinyConfig, TinyLM
from tether.models.tokenizer import CharTokenizer
from tether.tasks.registry import get_task


def _model(seed=0, vocab=11):
    torch.manual_seed(seed)
    return TinyLM(TinyConfig(vocab_size=vocab, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=32)).eval()


def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.99, 0.999, 1.0])
def test_ema_update_matches_reference_loop(decay):
    student, teacher = _model(0), frozen_copy(_model(1))
    ref = {n: p.detach().clone().double() for n, p in teacher.named_parameters()}
    for step in range(3):  # several steps: the teacher integrates the student's trajectory
        _perturb(student, step)
        ema_update(teacher, student, decay=decay)
        s = dict(student.named_parameters())
        for n in ref:  # the equation written out, element by element in float64
            ref[n] = decay * ref[n] + (1.0 - decay) * s[n].detach().double()
        for n, p in teacher.named_parameters():
            torch.testing.assert_close(p.double(), ref[n], rtol=1e-6, atol=1e-6)
    if decay == 0.0:  # the current student, exactly
        for (_, t), (_, s) in zip(teacher.named_parameters(), student.named_parameters()):
            assert torch.equal(t, s)


def test_decay_one_keeps_the_teacher_exactly():
    student, teacher = _model(0), frozen_copy(_model(1))
    before = copy.deepcopy(teacher.state_dict())
    _perturb(student, 0)
    ema_update(teacher, student, decay=1.0)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k])


def test_teacher_receives_no_gradient():
    student = _model(0)
    teacher = frozen_copy(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        logp_t = torch.log_softmax(teacher(tokens), -1)
    logp_s = torch.log_softmax(student.train()(tokens), -1)
    (logp_t.exp() * (logp_t - logp_s)).sum().backward()  # forward KL(teacher || student)
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    ema_update(teacher, student, decay=0.9)  # the update does not attach the teacher to the student's graph
    assert all(p.grad_fn is None and not p.requires_grad and p.grad is None for p in teacher.parameters())
    # even when the teacher's own output is used with gradients on, nothing can flow into it
    assert not torch.log_softmax(teacher(tokens), -1).requires_grad


def test_mismatched_modules_are_refused():
    with pytest.raises(ValueError, match="shape"):
        ema_update(_model(0, vocab=11), _model(0, vocab=12), decay=0.5)
    with pytest.raises(ValueError, match="decay"):
        ema_update(_model(0), _model(1), decay=1.5)


def _ctx(cfg):
    tok = CharTokenizer()
    task = get_task("arithmetic", max_digits=2, ops="+")
    student = _model(0, vocab=tok.vocab_size)
    engine = TorchEngine(copy.deepcopy(student), eos_id=tok.eos_id, pad_id=tok.pad_id)
    return Context(cfg, task, tok, student, engine)


@pytest.mark.parametrize("teacher_kind", [OPSDTeacher.FIXED, OPSDTeacher.EMA])
def test_opsd_batch_moves_the_teacher_by_the_ema_equation(teacher_kind):
    from tether.distill.loop import make_algorithm

    cfg = DistillConfig(algorithm=Algorithm.OPSD, opsd_teacher=teacher_kind, prompts_per_step=2, group_size=2,
                        max_new_tokens=4)
    ctx = _ctx(cfg)
    algo = make_algorithm(cfg, ctx.tokenizer, ctx.student)
    algo.batch(ctx, 0, 1)  # step 0: teacher = student, the update is a no-op
    for (_, t), (_, s) in zip(algo.teacher.named_parameters(), ctx.student.named_parameters()):
        assert torch.equal(t, s)
    before = {n: p.detach().clone() for n, p in algo.teacher.named_parameters()}
    _perturb(ctx.student, 5)  # stands in for an optimiser step
    batch = algo.batch(ctx, 1, 2)
    d = 0.999 if teacher_kind is OPSDTeacher.EMA else 1.0
    s = dict(ctx.student.named_parameters())
    for n, p in algo.teacher.named_parameters():
        torch.testing.assert_close(p, d * before[n] + (1 - d) * s[n].detach(), rtol=1e-6, atol=1e-7)
    assert not batch.signals["logp_teacher_BTV"].requires_grad


def test_caopd_batch_targets_answer_by_teacher_and_confidence_by_point_mass():
    from tether.distill.caopd import POINT_MASS_EPS
    from tether.distill.loop import make_algorithm
    from tether.distill.opd import teacher_logprobs

    cfg = DistillConfig(algorithm=Algorithm.CAOPD, confidence_label="c", max_new_tokens=10, prompts_per_step=2,
                        group_size=3)
    ctx = _ctx(cfg)
    algo = make_algorithm(cfg, ctx.tokenizer, ctx.student)
    batch = algo.batch(ctx, 0, 3)
    r, tok = batch.rollout, ctx.tokenizer
    lp = batch.signals["logp_teacher_BTV"]
    direct = teacher_logprobs(algo.teacher, r)
    for b in range(r.batch_size):
        p, n = int(r.prompt_len_B[b]), int(r.completion_len_B[b])
        text = tok.decode(r.tokens_BT[b, p:p + n].tolist())
        body_len = len(text.split("\n")[0])
        assert text.endswith(f"\nc{float(text.split('c')[-1]):.2f}") and r.tokens_BT[b, p + n - 1] == tok.eos_id
        torch.testing.assert_close(lp[b, p:p + body_len], direct[b, p:p + body_len])  # the EMA teacher
        suffix = lp[b, p + body_len:p + n]  # a point mass on the rewritten confidence line and eos
        target = r.tokens_BT[b, p + body_len:p + n]
        torch.testing.assert_close(suffix.exp().sum(-1), torch.ones(len(target)), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(suffix.gather(-1, target[:, None])[:, 0].exp(),
                                   torch.full((len(target),), 1 - POINT_MASS_EPS), rtol=1e-6, atol=1e-7)
    # the stated confidences are the groups' empirical success rates
    conf = [float(tok.decode(r.tokens_BT[b].tolist()).split("c")[-1]) for b in range(r.batch_size)]
    acc = (batch.rewards_B > 0.5).double().view(2, 3).mean(1)
    assert conf == pytest.approx([round(float(a), 2) for a in acc.repeat_interleave(3)])


def test_stated_confidence_task_variant():
    import random

    from tether.distill.caopd import StatedConfidence

    base = get_task("arithmetic", max_digits=2, ops="+")
    task = StatedConfidence(base, "c")
    ex = task.sample(random.Random(0))
    assert ex.solution == f"{ex.answer}\nc1.00"
    assert task.eval_examples() == base.eval_examples()
    assert task.reward(ex.prompt, ex.solution, ex.answer) == 1.0  # the reward reads the first line
    assert task.name != base.name  # a different warm-start cache entry


def test_config_field_validation_and_defaults():
    assert DistillConfig(algorithm=Algorithm.OPSD).ema_decay is None
    assert DistillConfig(algorithm=Algorithm.OPSD, opsd_teacher=OPSDTeacher.EMA).ema_decay == 0.999
    assert DistillConfig(algorithm=Algorithm.CAOPD, max_new_tokens=20).ema_decay == 0.99
    assert DistillConfig(algorithm=Algorithm.OPSD, opsd_teacher=OPSDTeacher.EMA, teacher_ema_decay=0.9).ema_decay == 0.9
    with pytest.raises(ValueError, match="teacher_ema_decay"):
        DistillConfig(algorithm=Algorithm.OPSD, teacher_ema_decay=0.9)  # the fixed teacher has no decay
    with pytest.raises(ValueError, match="teacher_ema_decay"):
        DistillConfig(algorithm=Algorithm.OPD, teacher_ema_decay=0.9)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="teacher_ema_decay"):
            DistillConfig(algorithm=Algorithm.OPSD, opsd_teacher=OPSDTeacher.EMA, teacher_ema_decay=bad)


def test_opsd_teacher_accepts_its_value_and_names_the_field_when_wrong():
    assert DistillConfig(algorithm="opsd", opsd_teacher="ema").opsd_teacher is OPSDTeacher.EMA
    with pytest.raises(ValueError, match="opsd_teacher"):
        DistillConfig(algorithm=Algorithm.OPSD, opsd_teacher="current")
