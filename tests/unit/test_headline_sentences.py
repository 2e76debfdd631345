"""The result of a run in sentences (issue 20 items 4-5): the standard errors against a loop over the samples,
the float-noise verdict on both sides of the floor, and the end-of-run text as `tether train` prints it."""

import json
import math

import pytest

from tether.meter.headline import (
    FLOAT_FLOOR,
    accuracy_sentence,
    accuracy_standard_error,
    difference_standard_error,
    duration,
    mismatch_verdict,
    reward_sentence,
)
from tether.train.summary import print_summary, write_summary

pytestmark = pytest.mark.unit


def _loop_se(outcomes):
    n = len(outcomes)
    mean = sum(outcomes) / n
    return math.sqrt(sum((x - mean) ** 2 for x in outcomes) / n / n)


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (62, 200), (200, 200), (1, 7)])
def test_accuracy_standard_error_is_the_sample_mean_s(k, n):
    outcomes = [1.0] * k + [0.0] * (n - k)
    assert accuracy_standard_error(k / n, n) == pytest.approx(_loop_se(outcomes), rel=1e-12, abs=1e-15)
    after = [1.0] * min(n, k + 2) + [0.0] * (n - min(n, k + 2))
    want = math.sqrt(_loop_se(outcomes) ** 2 + _loop_se(after) ** 2)
    assert difference_standard_error(k / n, sum(after) / n, n) == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_accuracy_standard_error_rejects_no_problems():
    with pytest.raises(ValueError, match="n must be positive"):
        accuracy_standard_error(0.5, 0)


def test_accuracy_and_reward_sentences():
    text = accuracy_sentence(0.31, 0.445, 200)
    se = 100 * math.hypot(math.sqrt(0.31 * 0.69 / 200), math.sqrt(0.445 * 0.555 / 200))
    assert text == f"held-out accuracy 31.0 % -> 44.5 % (+13.5 points, standard error {se:.1f} points, 200 problems)"
    assert accuracy_sentence(None, 0.5, 10) is None
    assert accuracy_sentence(0.25, 0.5, 20, episodes=True).startswith("held-out success rate 25.0 % -> 50.0 % (+25.0")
    assert accuracy_sentence(0.25, 0.5, 20, episodes=True).endswith(" points, 20 episodes)")
    assert reward_sentence(0.125, 0.5) == "mean reward 0.125 in the first quarter of steps, 0.5 in the last (+0.375)"
    assert duration(5.25) == "5.2 s" and duration(185) == "3 min 05 s" and duration(3720) == "1 h 02 min"


@pytest.mark.parametrize("precision", sorted(FLOAT_FLOOR))
def test_verdict_splits_at_the_float_floor(precision):
    floor = FLOAT_FLOOR[precision]
    beyond, text = mismatch_verdict(0.5 * floor, 0.2 * floor ** 2, precision)
    assert not beyond and text.startswith("no mismatch beyond float noise") and precision in text
    beyond, text = mismatch_verdict(2 * floor, 0.2 * floor ** 2, precision)
    assert beyond and text.startswith(f"engine mismatch {2 * floor:.3g} nats/token")
    assert mismatch_verdict(0.5 * floor, 2 * floor ** 2, precision)[0]  # the KL alone crosses
    assert mismatch_verdict(float("nan"), None, precision)[0]  # a NaN is never noise


def test_verdict_names_staleness_and_measured_nothing():
    beyond, text = mismatch_verdict(1e-7, 1e-14, "fp32", staleness=0.02)
    assert beyond and "staleness 0.02 nats/token" in text
    assert mismatch_verdict(None, None, "fp32") is None


def _summary(tmp_path, counters, abs_dlogp):
    rows = [{"step": s, "reward/mean": 0.1 * s, "time/step_s": 0.5, "mismatch/abs_logp_diff_mean": abs_dlogp,
             "meter/total/kl_k3": abs_dlogp ** 2 / 2} for s in range(8)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"task": "arithmetic", "objective": "tis", "model": "tiny", "mode": "sync", "rollout_precision": "fp32"}
    return write_summary(tmp_path, cfg, counters, 0.31, 0.445, tokens_total=1200, seconds=125.0,
                         extra={"eval/n": 200})


def test_end_summary_reads_as_sentences_and_json_keeps_raw_keys(tmp_path, capsys):
    s = _summary(tmp_path, {"reward_failed": 3, "skipped_steps": 0, "reward_failed/exact_match": 3}, 2e-7)
    print_summary(s)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"tether train: arithmetic, tiny, tis, sync, 8 steps, in {tmp_path}"
    assert lines[1].startswith("  held-out accuracy 31.0 % -> 44.5 % (+13.5 points, standard error ")
    assert "mean reward 0.05 in the first quarter of steps, 0.65 in the last (+0.6)" in out
    assert "took 2 min 05 s (0.50 s a step), 10 tokens/s sampled" in out
    assert "no mismatch beyond float noise" in out
    assert "counters: 3 reward calls failed; 3 reward calls failed (exact_match)" in out
    assert "steps skipped" not in out  # zero counters are left out
    assert "/" not in out.replace(str(tmp_path), "").replace("tokens/s", "").replace("nats/token", "")  # no raw keys
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["count/skipped_steps"] == 0 and saved["eval/n"] == 200 and saved["perf/tokens_per_s"] == 1200 / 125


def test_end_summary_reports_a_real_mismatch(tmp_path, capsys):
    print_summary(_summary(tmp_path, {"reward_failed": 0}, 3e-3))
    out = capsys.readouterr().out
    assert "engine mismatch 0.003 nats/token" in out and "float noise" not in out and "counters" not in out
