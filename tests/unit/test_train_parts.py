"""Pure pieces of the trainer: reward shaping, dynamic sampling, configs, checkpoints, metrics log."""

import argparse
import json

import pytest
import torch

from tether.configs import add_dataclass_arguments, build, config_from_args, load_config_file
from tether.train.checkpoint import load_latest_checkpoint, save_checkpoint
from tether.train.config import KLPlacement, TrainConfig
from tether.train.metrics_log import MetricsLog, read_metrics
from tether.train.shaping import informative_groups, soft_overlong_penalty

pytestmark = pytest.mark.unit


def test_soft_overlong_penalty_matches_dapo_definition():
    L, buf, c = 20, 5, 1.0
    lengths = torch.arange(0, 26)
    got = soft_overlong_penalty(lengths, L, buf, c)
    for n, g in zip(lengths.tolist(), got.tolist()):
        if n <= L - buf:
            want = 0.0
        else:
            want = max(-c * (n - (L - buf)) / buf, -c)
        assert g == pytest.approx(want, abs=1e-12)


def test_informative_groups_drops_all_equal_groups():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    assert informative_groups(rewards, groups).tolist() == [False, False, True, True, False, False, False]


def parse(argv):
    p = argparse.ArgumentParser()
    add_dataclass_arguments(p, TrainConfig)
    return config_from_args(TrainConfig, p.parse_args(argv))


def test_cli_flags_and_config_file_merge(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('steps = 7\nobjective = "tis"\nkl_placement = "loss"\nkl_coef = 0.1\n')
    cfg = parse(["--config", str(f), "--steps", "9", "--top-p", "0.9", "--no-progress"])
    assert cfg.steps == 9 and cfg.objective == "tis" and cfg.top_p == 0.9 and cfg.progress is False
    assert cfg.kl_placement is KLPlacement.LOSS
    y = tmp_path / "c.yaml"
    y.write_text("steps: 3\ntop_k: none\n")
    cfg = parse(["--config", str(y)])
    assert cfg.steps == 3 and cfg.top_k is None


@pytest.mark.parametrize(
    "values, field",
    [({"steps": "many"}, "steps"), ({"steps": 0}, "steps"), ({"kl_placement": "sideways"}, "kl_placement"),
     ({"lr": -1.0}, "lr"), ({"bogus": 1}, "bogus"), ({"kl_placement": "loss"}, "kl_coef"),
     ({"minibatches": 3}, "minibatches"), ({"steps": 2.5}, "steps")],
)
def test_bad_config_values_name_the_field(values, field):
    with pytest.raises(ValueError, match=field):
        build(TrainConfig, values)


def test_config_file_errors_name_the_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("steps = [\n")
    with pytest.raises(ValueError, match="bad.toml"):
        load_config_file(f)
    g = tmp_path / "c.toml"
    g.write_text("stepz = 3\n")
    with pytest.raises(ValueError, match="stepz.*c.toml"):
        build(TrainConfig, load_config_file(g), str(g))


def test_checkpoint_roundtrip_and_latest(tmp_path):
    assert load_latest_checkpoint(tmp_path) is None
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step)), "step": step}, run_id="r", keep=2)
    state = load_latest_checkpoint(tmp_path)
    assert state["step"] == 3 and torch.equal(state["w"], torch.full((2,), 3.0))
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert kept == ["step_000002", "step_000003"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_torn_checkpoint_write_leaves_previous_latest(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, {"step": 1}, run_id="r")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, {"step": 2}, run_id="r")
    monkeypatch.undo()
    assert load_latest_checkpoint(tmp_path)["step"] == 1


def test_metrics_log_resume_drops_lines_after_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for s in range(5):
        log.write({"step": s, "loss": torch.tensor(float(s)), "x": float("nan")})
    MetricsLog(path, resume_after_step=2)
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[1]["loss"] == 1.0 and rows[0]["x"] == "nan"
    assert json.loads(path.read_text().splitlines()[0])["step"] == 0
