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


def test_ess_of_weights_from_their_mean_and_spread_is_the_direct_ess():
    from tether.meter.headline import _ess_of_weights

    rng = __import__("random").Random(0)
    for n in (1, 2, 7, 50):
        w = [rng.uniform(0.0, 2.0) for _ in range(n)]
        mean = sum(w) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in w) / n)  # population, as weight_metrics logs it
        direct = sum(w) ** 2 / (n * sum(x * x for x in w))
        assert _ess_of_weights(mean, std) == pytest.approx(direct, rel=1e-12)
    assert _ess_of_weights(0.0, 0.0) == 1.0


def _default_job_rows():
    """Metric rows as the default job writes them: meter ratios, the exact decomposition, TIS's weight."""
    rows = []
    for s in range(4):
        e, st = 0.02 + 0.002 * s, 0.005 * s
        rows.append({"step": s, "meter/total/abs_logr_mean": e + st, "meter/engine/abs_logr_mean": e,
                     "meter/staleness/abs_logr_mean": st, "meter/total/kl_k3": 4e-4, "meter/version/age_mean": 1.0,
                     "meter/decomp/engine/var_share": 0.8 - 0.1 * s, "meter/decomp/staleness/var_share": 0.15 + 0.1 * s,
                     "meter/decomp/cross/var_share": 0.05, "meter/engine/ess_token": 0.99, "meter/total/ess_token": 0.9,
                     "tis/weight_mean": 1.0, "tis/weight_std": 0.1 * (s + 1), "tis/weight_max": 2.0,
                     "tis/clipfrac_high": 0.001 * s, "tis/clipfrac_low": 0.0, "pg/clipfrac": 0.3})
    return rows


def test_mismatch_numbers_are_run_means_and_the_correction_reads_its_own_ratio():
    from tether.meter.headline import _ess_of_weights, mismatch_numbers

    rows = _default_job_rows()
    n = mismatch_numbers(rows, "snapshot")
    assert n["mismatch/engine"] == pytest.approx(0.023) and n["mismatch/staleness"] == pytest.approx(0.0075)
    assert n["mismatch/engine_share"] + n["mismatch/staleness_share"] + n["mismatch/cross_share"] == pytest.approx(1)
    assert n["correction/prefix"] == "tis" and n["correction/truncated_frac"] == pytest.approx(0.0015)
    assert "correction/masked_frac" not in n
    assert n["correction/ess_before"] == 0.99  # snapshot: TIS weights pi_old(v)/mu, the engine ratio
    assert n["correction/ess_after"] == pytest.approx(sum(_ess_of_weights(1.0, 0.1 * k) for k in (1, 2, 3, 4)) / 4)
    assert mismatch_numbers(rows, "recompute")["correction/ess_before"] == 0.9  # pi_old(current)/mu: the total
    assert "correction/prefix" not in mismatch_numbers([{k: v for k, v in r.items() if not k.startswith("tis/")}
                                                        for r in rows])


def test_decomposition_and_correction_sentences():
    from tether.meter.headline import correction_sentence, decomposition_sentence, mismatch_numbers

    n = mismatch_numbers(_default_job_rows(), "snapshot")
    text = decomposition_sentence(n, "int8")
    assert text == ("mismatch pi_old/mu 0.0305 nats/token (KL 0.0004): from the int8 engine 0.023 nats/token, from "
                    "staleness (tokens 1 version old on average) 0.0075; of its variance 65 % engine, 30 % staleness, "
                    "5 % cross term")
    assert correction_sentence(n, "tis").startswith(
        "correction tis: weight truncated on 0.15 % of tokens, the other 99.85 % reweighted by pi_old/mu; ESS per "
        "token 0.99 before, ")
    assert correction_sentence({}, "grpo") == ("no mismatch correction: objective grpo logged no importance weight "
                                               "on pi_old/mu")
    assert decomposition_sentence({}, "fp32") is None
    no_split = {"mismatch/total": 0.01, "mismatch/age_mean": 1.0}
    assert decomposition_sentence(no_split).endswith("not separated (old_logits snapshot separates them)")


def test_a_negative_cross_term_is_said_in_words():
    from tether.meter.headline import decomposition_sentence

    n = {"mismatch/total": 0.005, "mismatch/engine_share": 0.42, "mismatch/staleness_share": 0.75,
         "mismatch/cross_share": -0.17}
    assert decomposition_sentence(n, "int8").endswith("42 % engine, 75 % staleness, -17 % cross term (the two parts "
                                                      "partly cancel)")
    assert "cancel" not in decomposition_sentence({**n, "mismatch/cross_share": 0.0}, "int8")
