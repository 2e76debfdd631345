"""Checkpoints under hostile, damaged, missing and full-disk conditions (issue 13, items 1, 2, 4, 5, 6).

Each test builds the on-disk situation by hand and goes through ``save_checkpoint`` /
``load_latest_checkpoint``, the calls the loops and ``tether export`` make."""

import errno
import hashlib
import json
import logging
import os
import shutil
from collections import OrderedDict

import pytest
import torch

from tether.train import checkpoint
from tether.train.checkpoint import CheckpointError, load_latest_checkpoint, save_checkpoint

pytestmark = pytest.mark.unit


def _state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"model": {"w": torch.randn(64, 64, generator=g), "b": torch.randn(64, generator=g)},
            "run_state": {"step": step, "accuracy_before": 0.25, "counters": {"reward_failed": 0}}}


def _write_run(root, steps=(1, 2), run_id="r"):
    for s in steps:
        save_checkpoint(root, s, _state(s), run_id=run_id, keep=len(steps))
    return root / "checkpoints"


def _assert_state(got: dict, step: int) -> None:
    want = _state(step)
    assert got["run_state"] == want["run_state"]
    for k in want["model"]:
        assert torch.equal(got["model"][k], want["model"][k]), k


class _Payload:
    """A pickle that would run code on load: it creates the file named in ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("with_manifest", [True, False])
def test_a_pickled_payload_is_refused_and_never_executed(tmp_path, with_manifest, caplog):
    """Item 1: a state.pt that needs code to load (an attacker may write its manifest too) is refused."""
    root = _write_run(tmp_path, steps=(1,))
    folder = root / "step_000002"
    folder.mkdir()
    marker = tmp_path / "PWNED"
    torch.save({"model": _Payload(marker)}, folder / "state.pt")
    if with_manifest:
        data = (folder / "state.pt").read_bytes()
        (folder / "manifest.json").write_text(json.dumps({"format": 1, "step": 2, "run_id": "r", "files": {
            "state.pt": {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}}))
    (root / "latest").write_text("step_000002")
    with caplog.at_level(logging.WARNING):
        state = load_latest_checkpoint(tmp_path)
    assert not marker.exists()
    _assert_state(state, 1)  # the newest intact checkpoint
    assert "refused: loading it would execute code" in caplog.text and "step_000002" in caplog.text
    shutil.rmtree(root / "step_000001")
    with pytest.raises(CheckpointError, match="no intact checkpoint.*step_000002: state.pt refused"):
        load_latest_checkpoint(tmp_path)
    assert not marker.exists()


def _flip_bytes(path, n=64):
    data = bytearray(path.read_bytes())
    at = len(data) // 2  # inside the tensor data (the zip's payload), far from its headers
    for i in range(at, at + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def _empty(path):
    path.write_bytes(b"")


def _garble(path):
    path.write_bytes(os.urandom(path.stat().st_size))


@pytest.mark.parametrize("damage", [_flip_bytes, _truncate, _empty, _garble])
def test_a_damaged_latest_falls_back_to_the_newest_intact_checkpoint(tmp_path, damage, caplog):
    """Item 4: flipped bytes load silently today, and a truncated / empty / garbled file stops the
    resume with a torch traceback although keep=2 kept an intact previous checkpoint."""
    root = _write_run(tmp_path, steps=(1, 2))
    damage(root / "step_000002" / "state.pt")
    with caplog.at_level(logging.WARNING):
        state = load_latest_checkpoint(tmp_path)
    _assert_state(state, 1)
    warning = caplog.text
    assert "step_000002 is damaged" in warning and "falling back to step_000001" in warning


def test_a_damaged_manifest_or_a_missing_folder_falls_back_too(tmp_path, caplog):
    root = _write_run(tmp_path, steps=(1, 2, 3))
    (root / "step_000003" / "manifest.json").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        _assert_state(load_latest_checkpoint(tmp_path), 2)
    assert "manifest.json is not a valid checkpoint manifest" in caplog.text
    shutil.rmtree(root / "step_000003")
    (root / "latest").write_text("step_000003")
    _assert_state(load_latest_checkpoint(tmp_path), 2)


def test_no_intact_checkpoint_is_an_error_naming_each_one(tmp_path):
    root = _write_run(tmp_path, steps=(1, 2))
    _empty(root / "step_000001" / "state.pt")
    _flip_bytes(root / "step_000002" / "state.pt")
    with pytest.raises(CheckpointError) as e:
        load_latest_checkpoint(tmp_path)
    assert "step_000001: state.pt has 0 bytes" in str(e.value)
    assert "step_000002: state.pt does not match the sha256" in str(e.value)


@pytest.mark.parametrize("latest", [None, "", "garbage\x00", "../../../etc/passwd", "step_000099"])
def test_a_missing_or_bad_latest_is_reconstructed_from_the_step_folders(tmp_path, latest, caplog):
    """Item 5: a deleted ``latest`` made the resume start again from step 0."""
    root = _write_run(tmp_path, steps=(4, 5))
    if latest is None:
        (root / "latest").unlink()
    else:
        (root / "latest").write_text(latest)
    with caplog.at_level(logging.WARNING):
        _assert_state(load_latest_checkpoint(tmp_path), 5)
    assert "step_000005" in caplog.text


def test_pruning_only_touches_this_runs_checkpoints(tmp_path):
    """Item 2: pruning sorted every step folder by name, so a new run deleted its own new checkpoint
    when an older run had written higher steps into the same directory."""
    root = _write_run(tmp_path, steps=(9, 10), run_id="old")
    save_checkpoint(tmp_path, 1, _state(1), run_id="new", keep=2)
    save_checkpoint(tmp_path, 2, _state(2), run_id="new", keep=2)
    save_checkpoint(tmp_path, 3, _state(3), run_id="new", keep=2)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000002", "step_000003", "step_000009",
                                                          "step_000010"]
    assert (root / "latest").read_text() == "step_000003"
    _assert_state(load_latest_checkpoint(tmp_path), 3)


def _fill_disk(monkeypatch):
    """Make the checkpoint's payload file a write into /dev/full: the kernel's ENOSPC, through torch."""
    def fake_open(path, mode="r", *args, **kwargs):
        if os.path.basename(str(path)) == "state.pt" and ("w" in mode or "x" in mode):
            return open("/dev/full", "wb")
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "open", fake_open, raising=False)  # the module's own name lookup


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_says_so_and_leaves_no_temporaries(tmp_path, monkeypatch):
    """Item 6: a full disk gave ``RuntimeError: [enforce fail at inline_container.cc:672]`` and leaked
    the temporary folder, which kept the disk full."""
    root = _write_run(tmp_path, steps=(3,))
    _fill_disk(monkeypatch)
    with pytest.raises(CheckpointError) as e:
        save_checkpoint(tmp_path, 4, _state(4), run_id="r")
    assert str(e.value).startswith(f"no space left on device while writing checkpoint step 4 to {root}; "
                                   "the previous checkpoint step 3 is intact")
    assert isinstance(e.value.__cause__, OSError) and e.value.__cause__.errno == errno.ENOSPC
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000003"]
    monkeypatch.undo()
    _assert_state(load_latest_checkpoint(tmp_path), 3)


def test_temporaries_of_a_killed_write_are_cleaned(tmp_path):
    root = _write_run(tmp_path, steps=(1,))
    (root / ".tmp-step_000002-4242").mkdir()
    (root / ".tmp-step_000002-4242" / "state.pt").write_bytes(b"x" * 100)
    (root / ".latest-4242").write_text("step_000002")
    removed = checkpoint.clean_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [".latest-4242", ".tmp-step_000002-4242"]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000001"]


def test_every_payload_type_round_trips_bitwise(tmp_path):
    """The loops' payload: int keys (optimizer state, async board versions), tuples (betas), None,
    nan, nested dicts, bf16 and 0-dim tensors."""
    state = {"optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(3)}},
                           "param_groups": [{"betas": (0.9, 0.95), "foreach": None, "params": [0]}]},
             "async": {"board": {7: OrderedDict(w=torch.randn(2, dtype=torch.bfloat16))}, "old_logits": {}},
             "run_state": {"step": 7, "x": float("nan"), "y": float("inf"), "flag": True, "name": "n"}}
    save_checkpoint(tmp_path, 7, state, run_id="r")
    got = load_latest_checkpoint(tmp_path)
    assert got["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert torch.equal(got["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert torch.equal(got["async"]["board"][7]["w"], state["async"]["board"][7]["w"])
    assert got["async"]["board"][7]["w"].dtype == torch.bfloat16
    assert got["run_state"]["x"] != got["run_state"]["x"] and got["run_state"]["y"] == float("inf")
    assert {k: v for k, v in got["run_state"].items() if k != "x"} == {k: v for k, v in state["run_state"].items()
                                                                       if k != "x"}


def test_a_payload_that_would_need_code_to_load_is_refused_at_save(tmp_path):
    with pytest.raises(TypeError, match=r"state\['run_state'\]\['when'\]: set is not plain data"):
        save_checkpoint(tmp_path, 1, {"run_state": {"when": {1, 2}}}, run_id="r")
    assert not (tmp_path / "checkpoints" / "latest").exists()


def test_a_checkpoint_from_before_manifests_loads_with_a_warning(tmp_path, caplog):
    root = _write_run(tmp_path, steps=(2,))
    (root / "step_000002" / "manifest.json").unlink()
    with caplog.at_level(logging.WARNING):
        _assert_state(load_latest_checkpoint(tmp_path), 2)
    assert "has no manifest.json" in caplog.text
