"""Two consecutive training steps draw different prompts and different rollouts (issue 22): the per-step
seed depends on the step, in the sync and the async loop (a seed without the step term fails here)."""

import pytest
import torch

from tether.train import async_loop, setup, sync
from tether.train.config import TrainConfig, TrainMode

pytestmark = pytest.mark.e2e


SMALL = dict(steps=3, prompts_per_step=4, group_size=2, max_new_tokens=4, warmstart_steps=0, eval_size=2,
             threads=1, seed=7, progress=False, checkpoint_every=100, plots=False)


@pytest.fixture
def draws(monkeypatch):
    """Records, per call, the prompts the loop samples and the seed and tokens of each rollout."""
    got = {"prompts": [], "rollout_seeds": [], "tokens": []}
    sample, generate = setup.sample_examples, setup.generate

    def recording_sample(task, cfg, seed):
        examples = sample(task, cfg, seed)
        got["prompts"].append([ex.prompt for ex in examples])
        return examples

    def recording_generate(policy, examples, cfg, seed):
        rollout = generate(policy, examples, cfg, seed)
        got["rollout_seeds"].append(seed)
        got["tokens"].append(rollout.tokens_BT)
        return rollout

    monkeypatch.setattr(setup, "sample_examples", recording_sample)
    monkeypatch.setattr(setup, "generate", recording_generate)
    return got


def test_consecutive_sync_steps_draw_different_prompts_and_rollouts(tmp_path, draws):
    sync.train(TrainConfig.from_flat(**SMALL, out=str(tmp_path / "run")))
    assert len(draws["prompts"]) == len(draws["rollout_seeds"]) == SMALL["steps"]
    _assert_each_step_differs(draws)


def test_consecutive_async_steps_draw_different_prompts(tmp_path, draws):
    async_loop.train(TrainConfig.from_flat(**SMALL, out=str(tmp_path / "run"), mode=TrainMode.ASYNC, max_staleness=1))
    assert len(draws["prompts"]) >= SMALL["steps"]  # the engine thread may sample ahead of the trainer
    prompts = draws["prompts"][:SMALL["steps"]]
    assert all(a != b for a, b in zip(prompts, prompts[1:])), prompts


def _assert_each_step_differs(draws):
    prompts, seeds, tokens = draws["prompts"], draws["rollout_seeds"], draws["tokens"]
    for s in range(1, len(prompts)):
        assert prompts[s] != prompts[s - 1], f"steps {s - 1} and {s} sampled the same prompts: {prompts[s]}"
        assert seeds[s] != seeds[s - 1]
        assert tokens[s].shape != tokens[s - 1].shape or not torch.equal(tokens[s], tokens[s - 1])
