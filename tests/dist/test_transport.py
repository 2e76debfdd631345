"""The filesystem weight transport (issue 16 item 2) and the dist config section, without Ray."""

import threading
import time

import pytest
import torch

from tether.dist.transport import FilesystemTransport, SyncTimeout
from tether.train.config import DistConfig, TrainConfig, TrainMode

pytest.importorskip("safetensors")


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 4, generator=g)
    return {"emb.weight": w, "head.weight": w, "b": torch.randn(3, generator=g, dtype=torch.float64)}


def test_round_trip_is_bitwise_and_old_versions_are_pruned(tmp_path):
    t = FilesystemTransport(tmp_path, keep=2)
    for v in range(4):
        sent = t.publish(_state(v), v)
        assert sent.version == v and sent.bytes == (tmp_path / f"v{v:06d}.safetensors").stat().st_size
    got, stats = t.receive(3, timeout_s=1, receiver="worker-0")
    assert all(torch.equal(got[k], _state(3)[k]) and got[k].dtype == _state(3)[k].dtype for k in got)
    assert stats.metrics()["sync/version"] == 3.0 and stats.metrics()["sync/bytes"] == sent.bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "v000002.ready", "v000002.safetensors", "v000003.ready", "v000003.safetensors"]


def test_a_version_never_published_fails_within_the_timeout_naming_the_receiver(tmp_path):
    t = FilesystemTransport(tmp_path)
    t0 = time.perf_counter()
    with pytest.raises(SyncTimeout, match=r"worker-7: weight version 5 not ready"):
        t.receive(5, timeout_s=0.3, receiver="worker-7")
    assert time.perf_counter() - t0 < 30


def test_the_receiver_waits_for_the_marker_not_the_file(tmp_path):
    t = FilesystemTransport(tmp_path)
    (tmp_path / "v000001.safetensors").write_bytes(b"half-written")  # no marker: must not be read
    timer = threading.Timer(0.3, lambda: t.publish(_state(1), 1))
    timer.start()
    got, _ = t.receive(1, timeout_s=20, receiver="worker-0")
    timer.join()
    assert torch.equal(got["b"], _state(1)["b"])


def test_dist_section_exists_only_in_mode_dist():
    cfg = TrainConfig.from_flat(mode="dist", rollout_workers=3, sync_timeout_s=5)
    assert cfg.mode is TrainMode.DIST and cfg.dist == DistConfig(rollout_workers=3, sync_timeout_s=5)
    assert TrainConfig.from_flat().dist is None
    with pytest.raises(ValueError, match="'rollout_workers' needs mode 'dist'"):
        TrainConfig.from_flat(rollout_workers=3)
    with pytest.raises(ValueError, match="needs mode 'dist'"):
        TrainConfig(dist=DistConfig())
    with pytest.raises(ValueError, match="'rollout_workers' must be >= 0"):
        TrainConfig.from_flat(mode="dist", rollout_workers=-1)
    with pytest.raises(ValueError, match="'max_staleness' needs mode 'async'"):
        TrainConfig.from_flat(mode="dist", max_staleness=1)
    with pytest.raises(ValueError, match="single-turn tasks on the torch engine"):
        TrainConfig.from_flat(mode="dist", env="frozenlake")


def test_trainer_ranks_is_a_dist_setting_of_at_least_one():
    assert TrainConfig.from_flat(mode="dist", trainer_ranks=2).dist.trainer_ranks == 2
    assert TrainConfig.from_flat(mode="dist").dist.trainer_ranks == 1  # the trainer alone, no process group
    with pytest.raises(ValueError, match="'trainer_ranks' must be >= 1, got 0"):
        TrainConfig.from_flat(mode="dist", trainer_ranks=0)
    with pytest.raises(ValueError, match="'trainer_ranks' needs mode 'dist'"):
        TrainConfig.from_flat(trainer_ranks=2)


def test_weight_transport_is_validated_at_the_edge():
    from tether.dist.transport import WeightTransport

    cfg = TrainConfig.from_flat(mode="dist", weight_transport="broadcast", rollout_workers=2)
    assert cfg.dist.weight_transport is WeightTransport.BROADCAST
    assert TrainConfig.from_flat(mode="dist").dist.weight_transport is WeightTransport.FS
    with pytest.raises(ValueError, match="'weight_transport' broadcast needs rollout_workers >= 1"):
        TrainConfig.from_flat(mode="dist", weight_transport="broadcast", rollout_workers=0)
    with pytest.raises(ValueError, match="'weight_transport'.*fs, broadcast"):
        TrainConfig.from_flat(mode="dist", weight_transport="nccl")
    with pytest.raises(ValueError, match="'weight_transport' needs mode 'dist'"):
        TrainConfig.from_flat(weight_transport="broadcast")
