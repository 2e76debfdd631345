"""Issue 16 item 6: ``--device cpu|cuda``, validated at the edge; the GPU tests are marked ``gpu`` and skip here
(saying why) when torch sees no CUDA device, so a machine with one runs them: ``pytest -m gpu tests/dist``."""

import pytest
import torch

from tether.train.config import TrainConfig

NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch.cuda.is_available() "
                                                                  "is false on this machine")


def test_device_is_validated_and_cuda_refused_without_a_gpu(monkeypatch):
    assert TrainConfig.from_flat().device == "cpu"
    with pytest.raises(ValueError, match="config field 'device' must be cpu or cuda, got 'tpu'"):
        TrainConfig.from_flat(device="tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"'device' cuda needs a CUDA GPU .*torch.cuda.is_available\(\) is false"):
        TrainConfig.from_flat(device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert TrainConfig.from_flat(device="cuda", mode="dist").device == "cuda"


@pytest.mark.gpu
@NO_GPU
def test_the_built_in_policy_and_its_engine_live_on_cuda():
    from tether.train import setup
    from tether.train.run import Run

    cfg = TrainConfig.from_flat(device="cuda", warmstart_steps=0)
    policy = setup.build_policy(cfg, setup.build_task(cfg))
    assert next(policy.model.parameters()).is_cuda and policy.engine.device.type == "cuda"


@pytest.mark.gpu
@pytest.mark.e2e
@NO_GPU
def test_a_dist_run_on_cuda_equals_the_same_run_with_the_in_process_worker(tmp_path, monkeypatch):
    from tests.dist.scenario import SMALL, digit_share
    from tether.dist import driver
    from tether.train import setup

    monkeypatch.setattr(Run, "score", digit_share)
    driver.train(TrainConfig.from_flat(**SMALL, device="cuda", rollout_workers=0, out=str(tmp_path / "cuda")))
    assert (tmp_path / "cuda" / "summary.json").exists()
