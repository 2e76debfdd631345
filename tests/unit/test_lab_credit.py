"""`tether lab --credit`: exact expected gradients of the turn-level credit estimators (tether.lab.credit)."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
import torch

from tests.processes import run, tether_command, tether_env
from tether.lab.credit import TRAJECTORIES, CreditLabConfig, expected_gradient, mdp, run_credit_lab

DOC = Path(__file__).resolve().parents[2] / "docs" / "agents-credit.md"


def rows(result):
    return {(r["estimator"], r["baseline"]): r for r in result["results"]}


def test_true_gradient_matches_finite_differences():
    cfg = CreditLabConfig()
    grad, J = mdp(cfg)[5], mdp(cfg)[6]
    for i in range(7):
        h = 1e-6
        up = list(cfg.logits)
        up[i] += h
        down = list(cfg.logits)
        down[i] -= h
        fd = (mdp(CreditLabConfig(logits=tuple(up)))[6] - mdp(CreditLabConfig(logits=tuple(down)))[6]) / (2 * h)
        assert fd == pytest.approx(float(grad[i]), abs=1e-8)
    assert 0 < J < 1


def test_enumeration_equals_a_loop_over_tuples():
    cfg = CreditLabConfig(group_size=2)
    rewards, mask, states, probs, scores, _, _ = parts = mdp(cfg)
    from tether.agent.credit import CREDIT

    want = torch.zeros(7, dtype=torch.float64)
    for pair in itertools.product(range(len(TRAJECTORIES)), repeat=2):
        idx = torch.tensor(pair)
        A = CREDIT["turn"](rewards[idx], mask[idx], torch.zeros(2, dtype=torch.long), states[idx], baseline="mean")
        g = sum(A[e, k] * scores[pair[e], k] for e in range(2) for k in range(2)) / 2
        want += probs[pair[0]] * probs[pair[1]] * g
    got, _ = expected_gradient("turn", "mean", cfg, parts)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("G", [2, 3])
def test_unbiased_estimators_exact_and_per_turn_index_bias_reproduced(G):
    res = rows(run_credit_lab(CreditLabConfig(group_size=G)))
    # leave-one-out baselines from independent episodes: E g = grad J exactly
    for name in ("episode", "turn_unbiased", "discounted"):
        assert res[(name, "loo")]["rel_error"] < 1e-10
    # a self-inclusive mean over a fixed-size cell: exactly (G-1)/G grad J
    for name in ("episode", "turn_unbiased"):
        r = res[(name, "mean")]
        assert r["cosine"] > 1 - 1e-12 and r["scale"] == pytest.approx((G - 1) / G, rel=1e-10)
        assert r["direction_error"] < 1e-10
    # per-turn-index cells whose membership depends on who continued: biased direction, whatever the baseline
    for b in ("std", "mean", "loo"):
        assert res[("turn", b)]["direction_error"] > 0.01
    assert res[("turn", "loo")]["cosine"] < 0.999
    # std normalisation biases every estimator's direction; the pooled and step-group baselines too
    for name in ("episode", "turn", "gigpo", "discounted"):
        assert res[(name, "std")]["cosine"] < 0.95
    assert res[("gigpo", "loo")]["direction_error"] > 0.01
    assert res[("discounted", "mean")]["direction_error"] > 0.01


def test_cli_prints_the_table_and_writes_json(tmp_path):
    r = run(tether_command("lab", "--credit", "--group-size", "2", "--markdown", "--out", str(tmp_path)),
            env=tether_env())
    assert r.returncode == 0, r.stderr
    assert "| turn_unbiased | mean* | 1.000000 | 0.5000 |" in r.stdout
    data = json.loads((tmp_path / "credit.json").read_text())
    assert data["group_size"] == 2 and len(data["results"]) == 15
    bad = run(tether_command("lab", "--credit", "--credit-baseline", "nope"), env=tether_env())
    assert bad.returncode != 0 and "valid: std" in bad.stderr


def test_docs_table_is_the_lab_output():
    from tether.lab.credit import markdown_table

    text = DOC.read_text()
    for G in (2, 3):
        table = markdown_table(run_credit_lab(CreditLabConfig(group_size=G)))
        assert table in text, f"regenerate: tether lab --credit --group-size {G} --markdown"
    assert re.search(r"tether lab --credit", text)
