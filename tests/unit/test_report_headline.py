"""`tether report` opens with the result (issue 20 item 4): the headline from summary.json and config.json, a
float-noise verdict that keeps an fp32 run's rounding off the axes, integer step ticks, labels in words."""

import json
import math
import re

import pytest
import torch

from tether.cli import main
from tether.meter import measure, to_floats
from tether.meter import report as report_mod

pytestmark = pytest.mark.unit


def noise_run(run_dir, scale, steps=6, B=8, T=16, precision="fp32"):
    """A run whose engine differs from the trainer by ``scale``-sized log-prob noise (fp32 rounding: 1e-7)."""
    run_dir.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    rows = []
    for step in range(steps):
        mu = torch.log(torch.rand(B, T, generator=g, dtype=torch.float64).clamp(min=1e-3))
        behave = mu + scale * torch.randn(B, T, generator=g, dtype=torch.float64)
        old = behave + scale * torch.randn(B, T, generator=g, dtype=torch.float64)
        mask = torch.ones(B, T, dtype=torch.bool)
        m = to_floats(measure(mask_BT=mask, logp_old_BT=old, logp_mu_BT=mu, logp_behave_old_BT=behave))
        m = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in m.items()}
        m.update({"step": step, "reward/mean": 0.1 * step, "mismatch/abs_logp_diff_mean": m["meter/total/abs_logr_mean"]})
        rows.append(json.dumps(m))
    (run_dir / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    (run_dir / "config.json").write_text(json.dumps({"task": "arithmetic", "model": "tiny", "objective": "tis",
                                                     "mode": "sync", "steps": steps, "rollout_precision": precision}))
    (run_dir / "summary.json").write_text(json.dumps({"eval/accuracy_before": 0.31, "eval/accuracy_after": 0.445,
                                                      "eval/n": 200, "task": "arithmetic", "objective": "tis"}))
    return run_dir


@pytest.fixture
def figures(monkeypatch):
    """Every figure the report draws, inspected before it is closed."""
    seen = []
    real = report_mod._save

    def keep(fig, path):
        fig.canvas.draw()
        seen.append((path.name, [(ax.get_xlabel(), ax.get_ylabel(), [t.get_text() for t in ax.get_xticklabels()],
                                  ax.get_ylim(), [t.get_text() for t in ax.texts]) for ax in fig.axes]))
        return real(fig, path)

    monkeypatch.setattr(report_mod, "_save", keep)
    return seen


def test_fp32_noise_run_reads_no_mismatch_and_pins_the_axes(tmp_path, figures):
    run = noise_run(tmp_path / "run", 1e-7)
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    result = re.search(r"<section id=result>(.*?)</section>", page, re.S).group(1)
    assert "held-out accuracy 31.0 % -&gt; 44.5 % (+13.5 points, standard error 4.8 points, 200 problems)" in result
    assert "mean reward 0 in the first quarter of steps, 0.5 in the last (+0.5)" in result
    assert "task arithmetic, model tiny, objective tis, mode sync, steps 6, rollout precision fp32" in result
    assert "no mismatch beyond float noise" in result
    drawn = dict(figures)
    assert set(drawn) == {"reward.png", "ess.png", "quantiles.png", "decomposition.png", "position.png"}
    (_, ylabel, _, (lo, hi), texts), = drawn["quantiles.png"]
    assert ylabel == "log r (nats/token)" and "no mismatch beyond float noise" in texts
    assert -1e-4 < lo and hi < 1e-4  # the floor's scale (fp32: 1e-5), not the noise's 1e-7
    top, shares = drawn["decomposition.png"]
    assert top[3][1] == pytest.approx(3e-10)  # 3 x floor^2, not the 1e-14 of the variance
    assert any("float noise" in t for t in shares[4])


def test_real_mismatch_is_autoscaled_and_named(tmp_path, figures):
    run = noise_run(tmp_path / "run", 0.05)
    main(["report", str(run)])
    page = (run / "report.html").read_text()
    assert "engine mismatch" in page and "no mismatch beyond float noise" not in page
    (_, _, _, (lo, hi), texts), = dict(figures)["quantiles.png"]
    assert hi > 0.05 and not texts


def test_step_ticks_are_integers_and_labels_are_words(tmp_path, figures):
    main(["report", str(noise_run(tmp_path / "run", 1e-7, steps=2))])  # 2 steps: matplotlib would tick 0.5
    for name, axes in figures:
        for xlabel, ylabel, ticks, _, _ in axes:
            if xlabel == "step":
                shown = [t.replace("\u2212", "-") for t in ticks if t]
                assert shown and all(re.fullmatch(r"-?\d+", t) for t in shown), (name, shown)
            assert not re.fullmatch(r"[\w.]+(/[\w.]+)+", ylabel or "x"), (name, ylabel)  # no raw metric key


def test_broken_summary_json_is_an_error_naming_it(tmp_path, capsys):
    run = noise_run(tmp_path / "run", 1e-7, steps=2)
    (run / "summary.json").write_text("{not json")
    assert main(["report", str(run)]) == 2
    assert "summary.json: invalid JSON" in capsys.readouterr().err


def test_smooth_is_the_trailing_mean_of_its_window():
    ys = [1.0, 2.0, math.nan, 4.0, 10.0]
    want = [1.0, 1.5, 2.0, 4.0, 7.0]  # windows [1] [1,2] [2,nan] [nan,4] [4,10] with the NaN skipped
    assert report_mod.smooth(ys, 2) == want
    assert math.isnan(report_mod.smooth([math.nan, math.nan], 3)[1])
    assert report_mod.smooth(ys[:2], 1) == ys[:2]


def test_accuracy_points_put_each_evaluation_after_its_update():
    """Before training at 0, step s's evaluation (after update s) at s + 1, after training after the last step:
    the same axis as the reward, which step s measures before its update."""
    records = [{"step": s, **({"eval/accuracy": 0.1 * s} if s in (1, 3) else {})} for s in range(6)]
    xs, ys = report_mod.accuracy_points(records, {"eval/accuracy_before": 0.05, "eval/accuracy_after": 0.9})
    assert xs == [0.0, 2.0, 4.0, 6.0] and ys == pytest.approx([0.05, 0.1, 0.3, 0.9])
    assert report_mod.accuracy_points(records, {}) == ([2.0, 4.0], pytest.approx([0.1, 0.3]))


def test_the_training_plot_draws_accuracy_from_the_summary_and_the_reward_smoothed(tmp_path, figures):
    """A run without --eval-every still gets its before -> after accuracy panel; 10+ steps of reward get the
    smoothed curve in front of the faint raw one."""
    run = noise_run(tmp_path / "run", 1e-3, steps=12)
    assert main(["report", str(run)]) == 0
    axes = dict(figures)["reward.png"]
    assert [a[1] for a in axes] == ["mean reward", "held-out accuracy"]
    from tether.train.plots import write_plots

    records = report_mod.read_records(run / "metrics.jsonl")
    write_plots(records, tmp_path, json.loads((run / "summary.json").read_text()))
    assert (tmp_path / "reward.png").stat().st_size > 0
