"""Every loop closes its engines at the end of a run (the ``Engine`` protocol's ``close``: a vLLM
server would otherwise live on until interpreter exit), once, after the engine's last use."""

from __future__ import annotations

import pytest

from tether.distill.config import Algorithm, DistillConfig
from tether.distill.loop import distill
from tether.engine.torch_engine import TorchEngine
from tether.train import async_loop, setup, sync
from tether.train.config import TrainConfig, TrainMode

pytestmark = pytest.mark.e2e
SMALL = dict(prompts_per_step=2, group_size=2, max_new_tokens=4, warmstart_steps=0, eval_size=2, threads=1,
             progress=False, steps=2)


@pytest.fixture
def closes(monkeypatch):
    """``(engine, its version)`` per ``close`` call; a closed engine that generates again is an error."""
    calls: list[tuple[TorchEngine, int]] = []
    generate = TorchEngine.generate

    def close(self) -> None:
        calls.append((self, self.version))

    def checked_generate(self, *args, **kwargs):
        assert all(e is not self for e, _ in calls), "the loop used its engine after closing it"
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(TorchEngine, "close", close)
    monkeypatch.setattr(TorchEngine, "generate", checked_generate)
    return calls


@pytest.mark.parametrize("loop,extra", [(sync, {}), (async_loop, {"mode": TrainMode.ASYNC})])
def test_rl_loops_close_their_engine_once_at_the_end(loop, extra, closes, tmp_path, monkeypatch):
    engines = []
    build = setup.build_policy

    def build_policy(cfg, task, *args):
        policy = build(cfg, task, *args)
        engines.append(policy.engine)
        return policy

    monkeypatch.setattr(setup, "build_policy", build_policy)
    loop.train(TrainConfig.from_flat(**SMALL, **extra, out=str(tmp_path)))
    assert [(e, v) for e, v in closes] == [(engines[0], 2)]  # the run's engine, at its final version


def test_distill_loop_closes_student_and_teacher_engines(closes, tmp_path):
    distill(DistillConfig(algorithm=Algorithm.OPD, steps=2, teacher_d_model=32, teacher_layers=1,
                          teacher_warmstart_steps=0, student_d_model=32, student_layers=1, student_warmstart_steps=0,
                          eval_size=2, prompts_per_step=2, group_size=2, max_new_tokens=4, progress=False, threads=1,
                          out=str(tmp_path)))
    assert sorted(v for _, v in closes) == [0, 2]  # the teacher's (never updated) and the student's (2 steps)
    assert len({id(e) for e, _ in closes}) == 2
