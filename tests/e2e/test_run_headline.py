"""A real int8 run (issue 20 items 4-5): `tether train` ends with sentences that name the engine mismatch, and
`tether report` opens with the same headline; the run's own mismatch.png is not pinned to the float floor."""

import json
import re

import pytest

from tether.cli import main

pytestmark = pytest.mark.e2e
TINY = ["--steps", "2", "--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "6",
        "--warmstart-steps", "30", "--eval-size", "10", "--threads", "1", "--no-progress", "--seed", "1",
        "--classic"]  # sync GRPO with only the engine's int8 (the default job's headline: test_default_job.py)


def test_int8_run_summary_and_report_name_the_mismatch(tmp_path, capsys):
    out = tmp_path / "int8"
    assert main(["train", *TINY, "--rollout-precision", "int8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    end = printed[printed.index("tether train: arithmetic"):]
    assert re.search(r"held-out accuracy \d+\.\d % -> \d+\.\d % \([+-]\d+\.\d points, standard error \d+\.\d points, "
                     r"10 problems\)", end), end
    assert "engine mismatch " in end and "float noise" not in end and "mismatch/" not in end
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rollout_precision"] == "int8" and summary["eval/n"] == 10
    assert summary["mismatch/abs_logp_diff_mean"] > 1e-5  # the int8 weights are a real mismatch
    assert main(["report", str(out)]) == 0
    result = re.search(r"<section id=result>(.*?)</section>", (out / "report.html").read_text(), re.S).group(1)
    assert "held-out accuracy" in result and "rollout precision int8" in result and "objective grpo" in result
    assert "engine mismatch" in result and "no mismatch beyond float noise" not in result
