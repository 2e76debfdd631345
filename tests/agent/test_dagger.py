"""DAgger (tether.agent.dagger): the beta schedule, the turn mixture, the labels and the aggregate, each against a
slow reference; the mixture through the episode runner; one 2-step `tether train --algorithm dagger` run."""

from __future__ import annotations

import json
import random

import pytest
import torch

from tests.agent.toy_envs import Tok, scripted_episodes
from tether.agent.dagger import (
    Aggregate,
    LabelRow,
    beta_schedule,
    label_rows,
    mixture_mask,
    sft_rollout,
)
from tether.agent.episodes import TEACHER_POLICY_ID
from tether.rollout import SamplingParams, Source
from tether.train.config import TrainConfig

ENV = "tests.agent.toy_envs:Copy"


def test_beta_schedule_is_beta0_times_p_to_the_i():
    for beta0, p in [(1.0, 0.5), (0.8, 0.9), (0.3, 1.0), (0.0, 0.5), (1.0, 0.0)]:
        ref = beta0
        for i in range(12):
            assert beta_schedule(i, beta0, p) == pytest.approx(ref, rel=1e-12, abs=1e-300)
            ref *= p
    assert beta_schedule(0, 1.0, 0.0) == 1.0  # 0^0 = 1: step 0 is the teacher's alone
    for bad in [dict(step=-1, beta0=1.0, decay=0.5), dict(step=0, beta0=1.5, decay=0.5),
                dict(step=0, beta0=1.0, decay=-0.1)]:
        with pytest.raises(ValueError, match="beta_schedule"):
            beta_schedule(**bad)


def test_mixture_mask_is_the_seeded_uniform_draw_below_beta():
    for beta in (0.0, 0.3, 0.7, 1.0):
        m = mixture_mask(beta, 5, 4, seed=11)
        u = torch.rand(5, 4, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
        ref = [[u[e, k].item() < beta for k in range(4)] for e in range(5)]
        assert m.tolist() == ref
    assert not mixture_mask(0.0, 3, 3, 0).any() and mixture_mask(1.0, 3, 3, 0).all()
    frac = float(mixture_mask(0.25, 200, 50, 3).double().mean())
    assert abs(frac - 0.25) < 0.02  # 10000 draws: 5 standard deviations
    assert torch.equal(mixture_mask(0.5, 4, 4, 5), mixture_mask(0.5, 4, 4, 5))


def test_aggregate_keeps_every_row_and_samples_without_replacement():
    rows = [LabelRow((i,), (i, i), (0.0, 0.0)) for i in range(10)]
    d = Aggregate()
    d.add(rows[:4])
    d.add(rows[4:])
    assert d.rows == rows  # D <- D ∪ new, in order
    s = d.sample(6, seed=1)
    order = list(range(10))
    random.Random(1).shuffle(order)
    assert s == [rows[i] for i in order[:6]]
    assert sorted(r.context[0] for r in d.sample(99, seed=2)) == list(range(10))  # n >= |D|: all of D
    back = Aggregate()
    back.load_state_dict(d.state_dict())
    assert back.rows == d.rows


def test_sft_rollout_puts_the_loss_on_the_labels_only():
    rows = [LabelRow((5, 6, 7), (8, 9), (-0.5, -0.25)), LabelRow((5,), (4,), (0.0,))]
    r = sft_rollout(rows, pad_id=0, vocab_size=20, version=3, params=SamplingParams(top_k=2))
    assert r.tokens_BT.tolist() == [[5, 6, 7, 8, 9], [5, 4, 0, 0, 0]]
    assert r.loss_mask_BT.tolist() == [[False, False, False, True, True], [False, True, False, False, False]]
    assert r.logp_mu_BT[0, 3:].tolist() == [-0.5, -0.25] and r.version_BT[r.loss_mask_BT].eq(3).all()
    assert (r.kept_count_BT == 20).all()  # the label is scored under the full vocabulary
    with pytest.raises(ValueError, match="no rows"):
        sft_rollout([], pad_id=0, vocab_size=20, version=0, params=SamplingParams())


def test_teacher_acts_where_the_mask_says_and_labels_every_visited_state():
    from tests.agent.toy_envs import Copy

    mask = torch.tensor([[True, True], [False, False], [True, False]])
    batch = scripted_episodes(mask)
    r, tok = batch.rollout, Tok()
    for e in range(3):
        env = Copy()
        env.reset(e)
        targets = list(env.target)
        assert [lab for lab in batch.labels[e]] == [tok.encode(t) + [29] for t in targets]  # a*_T(s) at each state
        for k, (a, b) in enumerate(batch.action_spans[e]):
            src = r.source_BT[e, a:b]
            if mask[e, k]:
                assert (src == Source.TEACHER).all() and (r.policy_id_BT[e, a:b] == TEACHER_POLICY_ID).all()
                assert r.tokens_BT[e, a:b].tolist() == batch.labels[e][k] and (r.logp_mu_BT[e, a:b] == 0).all()
            else:
                assert (src == Source.POLICY).all() and (r.policy_id_BT[e, a:b] == 0).all()
                assert r.tokens_BT[e, a:b].tolist() == [26, 29] and (r.logp_mu_BT[e, a:b] == -0.5).all()
    assert batch.success_E.tolist() == [True, False, False]  # the teacher solves Copy, the student never does
    assert not r.loss_mask_BT[r.source_BT == Source.TEACHER].any()  # teacher tokens never enter the RL loss
    rows = label_rows(batch)
    ref = [(tuple(r.tokens_BT[e, :a].tolist()), tuple(batch.labels[e][k]))
           for e in range(3) for k, (a, _) in enumerate(batch.action_spans[e])]
    assert [(x.context, x.label) for x in rows] == ref  # (s_{e,k}, a*_T(s_{e,k})) for every turn that happened
    assert all(x.label_logp == (0.0,) * len(x.label) for x in rows)


def test_label_rows_needs_a_teacher():
    batch = scripted_episodes(torch.zeros(1, 2, dtype=torch.bool))
    batch.labels = []
    with pytest.raises(ValueError, match="without a teacher"):
        label_rows(batch)


def test_dagger_flags_are_validated_at_the_edge():
    base = dict(env=ENV, algorithm="dagger")
    assert TrainConfig.from_flat(**base).objective == "sft"  # the default objective becomes DAgger's SFT
    for field, value in [("dagger_beta", 1.5), ("dagger_beta_decay", -0.5), ("dagger_rows", 0),
                         ("algorithm", "dagg"), ("objective", "grpo_x")]:
        with pytest.raises(ValueError, match=field if field != "objective" else "objective"):
            TrainConfig.from_flat(**{**base, field: value})
    for objective in ("ppo", "grpo"):  # an objective given explicitly is kept and refused, never replaced by sft
        with pytest.raises(ValueError, match="must be sft \\(or pear\\) with algorithm dagger"):
            TrainConfig.from_flat(**base, objective=objective)
    with pytest.raises(ValueError, match="mode 'sync'"):
        TrainConfig.from_flat(**base, mode="async")
    with pytest.raises(ValueError, match="algorithm dagger"):
        TrainConfig.from_flat(env=ENV, objective="sft")


@pytest.mark.e2e
def test_two_dagger_steps_aggregate_labels_and_meter_each_source(tmp_path):
    from tether.cli import main

    out = tmp_path / "run"
    rc = main(["train", "--env", ENV, "--algorithm", "dagger", "--dagger-beta", "0.8", "--dagger-beta-decay",
               "0.5", "--dagger-rows", "24", "--steps", "2", "--prompts-per-step", "4", "--group-size", "4",
               "--max-new-tokens", "3", "--warmstart-steps", "5", "--eval-size", "8", "--threads", "1",
               "--no-progress", "--quiet", "--out", str(out)])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["dagger/beta"] for r in rows] == pytest.approx([0.8, 0.4])
    # 16 episodes of <= 2 turns per step: every visited state labelled, D grows, 24 rows trained per step at most
    assert 16 <= rows[0]["dagger/aggregate_rows"] <= 32 and rows[1]["dagger/aggregate_rows"] > rows[0]["dagger/aggregate_rows"]
    assert [r["dagger/trained_rows"] for r in rows] == [min(24, r["dagger/aggregate_rows"]) for r in rows]
    for r in rows:
        assert r["sft/nll"] > 0 and r["loss"] == pytest.approx(r["sft/nll"], rel=1e-5)
        n_t, n_p = r["agent/mismatch/teacher/n_tokens"], r["agent/mismatch/policy/n_tokens"]
        assert n_t + n_p > 0 and r["dagger/teacher_token_frac"] == pytest.approx(n_t / (n_t + n_p))
        if n_t:  # student vs the deterministic teacher: log pi(label) < 0
            assert r["agent/mismatch/teacher/abs_logr_mean"] > 0
        if n_p:  # engine vs trainer on the student's own turns
            assert r["agent/mismatch/policy/abs_logr_mean"] < 1e-4
    assert json.loads((out / "config.json").read_text())["objective"] == "sft"


@pytest.mark.e2e
def test_resumed_dagger_run_equals_uninterrupted(tmp_path):
    """The aggregate is in the checkpoint: step 1 trains on a sample of step 0's labels too, so a resume that
    lost it would train on other rows."""
    from tether.train.checkpoint import load_checkpoint_dir
    from tether.train.sync import train

    small = dict(env=ENV, algorithm="dagger", prompts_per_step=4, group_size=4, max_new_tokens=3, warmstart_steps=5,
                 eval_size=8, progress=False, quiet=True, threads=1, checkpoint_every=1, dagger_rows=40)
    train(TrainConfig.from_flat(**small, steps=2, out=str(tmp_path / "full")))
    train(TrainConfig.from_flat(**small, steps=1, out=str(tmp_path / "part")))
    train(TrainConfig.from_flat(**small, steps=2, out=str(tmp_path / "part"), resume=str(tmp_path / "part")))
    a, b = (load_checkpoint_dir(tmp_path / name / "checkpoints" / "step_000002").state for name in ("full", "part"))
    assert a["agent"]["dagger"] == b["agent"]["dagger"] and len(a["agent"]["dagger"]["label"]) > 0
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_scripted_teacher_needs_the_environments_solver(tmp_path):
    from tether.train.sync import train

    with pytest.raises(ValueError, match="no scripted solver"):
        train(TrainConfig.from_flat(env="tests.agent.toy_envs:NoSolver", algorithm="dagger", warmstart_steps=0,
                                    progress=False, quiet=True, threads=1, steps=1, out=str(tmp_path / "run")))
