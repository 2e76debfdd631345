"""``tether train --mode dist`` from the command line, without Ray (``--rollout-workers 0``: one worker in the
trainer's process, the same worker code and filesystem transport as the actors), and the post-sync probe's
alarm: a bf16 rollout engine's log-probs differ from the fp32 trainer's, so a 1e-6 threshold must fire."""

import json

import pytest

from tests.processes import run, tether_command, tether_env

pytestmark = pytest.mark.e2e
pytest.importorskip("safetensors")


def test_dist_cli_without_ray_logs_the_sync_and_the_probe_alarm(tmp_path):
    out, sync_dir = tmp_path / "run", tmp_path / "weights"
    done = run(tether_command(
        "train", "--mode", "dist", "--rollout-workers", "0", "--steps", "2", "--prompts-per-step", "2",
        "--group-size", "2", "--max-new-tokens", "4", "--warmstart-steps", "0", "--eval-size", "2", "--threads", "1",
        "--rollout-precision", "bf16", "--probe-prompts", "1", "--probe-max-logp-diff", "1e-6",
        "--sync-dir", str(sync_dir), "--sync-timeout-s", "30", "--max-worker-restarts", "0", "--no-progress",
        "--out", str(out)), env=tether_env())
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["sync/version"] for r in rows] == [0.0, 1.0]
    assert all(r["sync/bytes"] == (sync_dir / "v000002.safetensors").stat().st_size for r in rows)
    assert all(r["sync/probe_max_abs_logp_diff"] > 1e-6 and r["alarm/sync_probe"] == 1 for r in rows)
    assert (sync_dir / "v000002.ready").exists()
    assert json.loads((out / "config.json").read_text())["rollout_workers"] == 0


def test_a_resumed_dist_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    import torch

    from tests.dist.scenario import SMALL, digit_share
    from tether.dist import driver
    from tether.train import setup
    from tether.train.run import Run
    from tether.train.checkpoint import load_checkpoint_dir
    from tether.train.config import TrainConfig

    monkeypatch.setattr(Run, "score", digit_share)  # non-zero advantages on the untrained model
    flat = dict(SMALL, rollout_workers=0, checkpoint_every=1)
    driver.train(TrainConfig.from_flat(**flat, out=str(tmp_path / "full")))
    driver.train(TrainConfig.from_flat(**{**flat, "steps": 1}, out=str(tmp_path / "cut")))
    driver.train(TrainConfig.from_flat(**flat, resume=str(tmp_path / "cut")))

    def weights(run, step):
        return load_checkpoint_dir(tmp_path / run / "checkpoints" / f"step_{step:06d}").state["model"]

    a, b = weights("full", 3), weights("cut", 3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["update/relative_norm"] > 0 for r in rows)  # every step moved the weights
