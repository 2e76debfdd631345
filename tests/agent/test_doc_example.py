"""docs/agents.md's "write your own environment" example, read from the markdown and run as it stands."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from tether.agent.envs import make_env_factory
from tether.train.config import TrainConfig

pytestmark = pytest.mark.e2e
DOC = Path(__file__).resolve().parents[2] / "docs" / "agents.md"


def _doc_blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```$", DOC.read_text(), flags=re.S | re.M)


def _example(tmp_path) -> Path:
    blocks = [b for b in _doc_blocks("python") if b.startswith("# my_envs.py\n")]
    assert len(blocks) == 1, "docs/agents.md must hold exactly one ```python block starting '# my_envs.py'"
    assert 20 <= len(blocks[0].splitlines()) <= 40  # the ~30-line example the doc promises
    path = tmp_path / "my_envs.py"
    path.write_text(blocks[0])
    return path


def _commands() -> list[str]:
    return [line for b in _doc_blocks("bash") for line in b.splitlines() if "my_envs" in line]


def test_the_docs_example_environment_plays_as_documented(tmp_path, monkeypatch, capsys):
    path = _example(tmp_path)
    env = make_env_factory(f"{path}:Echo")()
    first = env.reset(3)
    letter = first.split()[-1]
    assert first == f"say {letter}\n" and env.expert_action() == letter
    wrong = next(c for c in "abc" if c != letter)
    hint = env.step(wrong)  # a wrong letter: a tool hint, the episode goes on
    assert (hint.done, hint.reward, hint.observation, hint.source.name) == (False, 0.0, f"={letter}\n", "TOOL")
    last = env.step(f" {letter} ")
    assert last.done and last.reward == 1.0 and last.info["success"]
    # the doc's own command line, run in the directory that holds my_envs.py
    cmd = next(c for c in _commands() if c.startswith("python -c "))
    monkeypatch.chdir(tmp_path)
    exec(compile(shlex.split(cmd)[2], "docs/agents.md", "exec"), {})
    assert capsys.readouterr().out == make_env_factory(f"{path}:Echo")().reset(0) + "\n"


def test_the_docs_example_trains_one_step(tmp_path):
    path = _example(tmp_path)
    assert any(c.startswith("tether train --env my_envs.py:Echo") for c in _commands())
    from tether.train.sync import train

    cfg = TrainConfig.from_flat(env=f"{path}:Echo", steps=1, prompts_per_step=4, group_size=4, max_new_tokens=3,
                                warmstart_steps=5, eval_size=8, progress=False, threads=1, out=str(tmp_path / "run"))
    summary = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["task"] == f"env {path}:Echo" and len(rows) == 1
    r = rows[0]
    assert 1 <= r["agent/turns_mean"] <= 2 and r["agent/outcome_done_frac"] + r["agent/outcome_budget_frac"] == 1
    assert r["agent/tokens_env_frac"] == 0 and r["reward/mean"] == pytest.approx(r["agent/return_mean"])
