"""BEPA (tether.agent.bepa): the all-fail rule and the injection against slow references, the cache's refresh
and bound, the CACHE tokens in the loss, and one 2-step `tether train --algorithm bepa` run."""

from __future__ import annotations

import json

import pytest
import torch

from tests.agent.toy_envs import scripted_episodes
from tether.agent.bepa import (
    TrajectoryCache,
    all_fail_groups,
    assimilate,
    injection_rows,
    replace_episode,
    select_episode,
)
from tether.agent.dagger import ScriptedTeacher
from tether.rollout import Source
from tether.train.config import TrainConfig

ENV = "tests.agent.toy_envs:Copy"


def test_all_fail_rule_matches_a_loop_over_groups():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        group = torch.randint(0, 4, (12,), generator=g)
        success = torch.rand(12, generator=g) < 0.3
        ref = [not any(bool(success[j]) for j in range(12) if group[j] == group[e]) for e in range(12)]
        assert all_fail_groups(success, group).tolist() == ref
        last = {}
        for e in range(12):
            if ref[e]:
                last[int(group[e])] = e
        assert injection_rows(success, group) == last


def test_replace_episode_puts_the_cached_row_in_place_as_cache_tokens():
    student = scripted_episodes(torch.zeros(3, 2, dtype=torch.bool))  # the student always fails Copy
    expert = scripted_episodes(torch.ones(1, 2, dtype=torch.bool))  # the scripted teacher at every turn: a success
    assert not student.success_E.any() and bool(expert.success_E[0])
    out = replace_episode(student, 1, expert, pad_id=0, vocab_size=30)
    r, c = out.rollout, expert.rollout
    n = int(c.attention_mask_BT[0].sum())
    assert r.tokens_BT[1, :n].tolist() == c.tokens_BT[0, :n].tolist() and not r.attention_mask_BT[1, n:].any()
    assert torch.equal(r.source_BT[1, :n], torch.where(c.source_BT[0, :n] == Source.TEACHER,
                                                       torch.tensor(int(Source.CACHE), dtype=torch.int8),
                                                       c.source_BT[0, :n]))
    assert torch.equal(r.logp_mu_BT[1, :n], c.logp_mu_BT[0, :n])  # the behaviour log-probs it was recorded with
    assert r.group_B.tolist() == student.rollout.group_B.tolist()  # it joins the failing group
    for e in (0, 2):  # the other rows unchanged
        m = int(student.rollout.attention_mask_BT[e].sum())
        assert r.tokens_BT[e, :m].tolist() == student.rollout.tokens_BT[e, :m].tolist()
        assert torch.equal(r.source_BT[e, :m], student.rollout.source_BT[e, :m])
    assert out.success_E.tolist() == [False, True, False] and out.returns_E[1] == expert.returns_E[0]
    assert r.loss_mask_BT[1].sum() == (c.source_BT[0] == Source.TEACHER).sum()  # CACHE tokens enter the loss
    assert out.state_EK[1, 0] > student.state_EK.max()  # fresh anchor ids: no false GiGPO step groups
    assert out.action_spans[1] == expert.action_spans[0]


def test_assimilate_refreshes_with_own_successes_and_injects_only_into_all_fail_groups():
    mask = torch.tensor([[True, True], [False, False], [False, False], [False, False]])
    batch = scripted_episodes(mask)  # groups 0..3 (one episode each): only group 0 succeeds
    keys = [10, 11, 12, 13]
    cache = TrajectoryCache(size=8)
    seeded = []

    def seed_fn(key):
        seeded.append(key)
        return scripted_episodes(torch.ones(1, 2, dtype=torch.bool)) if key != 13 else scripted_episodes(torch.zeros(1, 2, dtype=torch.bool))

    out, m = assimilate(batch, keys, cache, seed_fn, pad_id=0, vocab_size=30)
    assert seeded == [11, 12, 13]  # the all-fail groups without an entry
    assert m["bepa/refreshed"] == 1 and m["bepa/injected"] == 2 and m["bepa/cache_size"] == 3  # 13's seed failed
    assert m["bepa/sampled_success_rate"] == 0.25
    assert out.success_E.tolist() == [True, True, True, False]
    assert (out.rollout.source_BT[0] != Source.CACHE).all()  # a group with a success is left alone
    assert (out.rollout.source_BT[1] == Source.CACHE).any() and (out.rollout.source_BT[3] != Source.CACHE).all()
    assert torch.equal(cache.get(10).rollout.tokens_BT, select_episode(batch, 0).rollout.tokens_BT)
    out2, m2 = assimilate(batch, keys, cache, None, pad_id=0, vocab_size=30)  # cached now: no seeding needed
    assert m2["bepa/injected"] == 2


def test_cache_drops_the_oldest_entry_beyond_its_size():
    cache = TrajectoryCache(size=2)
    row = scripted_episodes(torch.ones(1, 2, dtype=torch.bool))
    for k in (1, 2, 1, 3):
        cache.put(k, row)
    assert list(cache.entries) == [1, 3]


def test_scripted_teacher_needs_a_solver():
    class NoSolver:
        pass

    with pytest.raises(ValueError, match="expert_action"):
        ScriptedTeacher(None).label(NoSolver())


def test_bepa_flags_are_validated_at_the_edge():
    with pytest.raises(ValueError, match="bepa_cache_size"):
        TrainConfig.from_flat(env=ENV, algorithm="bepa", bepa_cache_size=0)
    with pytest.raises(ValueError, match="mode 'sync'"):
        TrainConfig.from_flat(env=ENV, algorithm="bepa", mode="async")


@pytest.mark.e2e
def test_two_bepa_steps_inject_into_all_fail_groups_and_meter_the_cache(tmp_path):
    from tether.cli import main

    out = tmp_path / "run"
    rc = main(["train", "--env", ENV, "--algorithm", "bepa", "--bepa-cache-size", "3", "--steps", "2",
               "--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "3", "--warmstart-steps", "5",
               "--eval-size", "8", "--threads", "1", "--no-progress", "--quiet", "--out", str(out)])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["bepa/cache_size"] <= 3
        # each injected row's actions are CACHE tokens (the solver's: 2 turns of letter + EOS), metered apart
        assert r["agent/mismatch/cache/n_tokens"] == 4 * r["bepa/injected"]
        if r["bepa/injected"]:
            assert r["agent/mismatch/cache/abs_logr_mean"] > 0  # log pi(solver's tokens) vs the solver's log mu 0
        assert r["agent/mismatch/policy/abs_logr_mean"] < 1e-4
        assert r["agent/success_rate"] >= r["bepa/sampled_success_rate"]
    assert sum(r["bepa/injected"] for r in rows) > 0  # the 5-step warm start fails most groups


def test_cache_state_is_plain_data_and_round_trips(tmp_path):
    from tether.rollout import SamplingParams
    from tether.train.checkpoint import check_plain

    cache = TrajectoryCache(size=4)
    cache.put(7, scripted_episodes(torch.ones(1, 2, dtype=torch.bool)))
    cache.put(9, scripted_episodes(torch.tensor([[True, False]])))
    sd = cache.state_dict()
    check_plain(sd)
    torch.save(sd, tmp_path / "c.pt")
    back = TrajectoryCache(size=4)
    back.load_state_dict(torch.load(tmp_path / "c.pt", weights_only=True), SamplingParams(max_new_tokens=2))
    assert list(back.entries) == [7, 9]
    for k in (7, 9):
        x, y = cache.get(k), back.get(k)
        for f in TrajectoryCache._ROW:
            u, v = getattr(x.rollout, f), getattr(y.rollout, f)
            assert (u is None and v is None) or torch.equal(u, v), f
        assert torch.equal(x.rewards_EK, y.rewards_EK) and x.action_spans == y.action_spans
        assert x.outcomes == y.outcomes and torch.equal(x.success_E, y.success_E)
