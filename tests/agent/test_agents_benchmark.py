"""benchmarks/agents.py (issue 14's credit benchmark) at a toy size, so the script cannot rot."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "agents.py"
_spec = importlib.util.spec_from_file_location("bench_agents", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

TOY = dict(steps=2, warmstart_steps=3, prompts_per_step=2, group_size=2, eval_size=4)


def test_one_run_records_success_curve_and_clocks_then_resumes(tmp_path):
    r = bench.train_one("frozenlake", "turn_unbiased", 0, out=tmp_path, **TOY)
    assert r["settings"]["credit"] == "turn_unbiased" and r["settings"]["steps"] == 2
    assert len(r["curve"]) == 2 and all(0 <= s <= 1 for s in r["curve"])
    assert 0 <= r["success_before"] <= 1 and 0 <= r["success_after"] <= 1
    assert r["step_wall_s"] > 0 and r["step_cpu_s"] > 0 and r["tokens_per_s"] > 0
    assert r["run_wall_s"] >= r["rl_wall_s"] > 0
    rows = [json.loads(x) for x in (tmp_path / "runs" / "frozenlake-turn_unbiased-0" / "metrics.jsonl").open()]
    assert all(row["bench/cpu_s"] > 0 for row in rows)
    import tether.train.run as run_module

    assert run_module.MetricsLog.__name__ == "MetricsLog"  # the step clock is removed after the run

    # resumable: the record on disk is returned, nothing is trained again
    (tmp_path / "frozenlake-turn_unbiased-0.json").write_text(json.dumps({**r, "success_after": 0.123}))
    assert bench.train_one("frozenlake", "turn_unbiased", 0, out=tmp_path, **TOY)["success_after"] == 0.123


def test_summary_table_pairs_against_episode_and_counts_the_goal():
    def rec(credit, seed, before, after):
        return {"env": "e", "credit": credit, "seed": seed, "success_before": before, "success_after": after,
                "curve": [0.1, 0.2, 0.3, 0.5], "step_wall_s": 1.0, "step_cpu_s": 0.5, "tokens_per_s": 100.0,
                "run_wall_s": 60.0}

    results = [rec("episode", 0, 0.3, 0.4), rec("episode", 1, 0.2, 0.6),
               rec("gigpo", 0, 0.3, 0.55), rec("gigpo", 1, 0.2, 0.5),
               {"env": "e", "credit": "turn", "seed": 0, "error": "boom"}]
    rows = {r["credit"]: r for r in bench.summarise(results)}
    g = rows["gigpo"]
    assert g["change_mean"] == pytest.approx(27.5) and g["goal_met"] == 2
    assert g["vs_episode_mean"] == pytest.approx((15 - 10) / 2) and g["vs_episode_sd"] == pytest.approx(17.6776695)
    assert rows["episode"]["goal_met"] == 1 and g["train_last_quarter_mean"] == pytest.approx(50.0)
    assert rows["turn"]["failed"] == 1 and "error" in rows["turn"]
    text = bench.table(list(rows.values()))
    assert "+27.5 ± 3.5" in text and "+2.5 ± 17.7" in text and "failed (1/1)" in text
