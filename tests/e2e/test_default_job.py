"""The default job (issue 24, docs/default_job.md): its choices are the documented ones, flags that pick a job of
their own turn it off, and a short run of it shows a real mismatch, its engine / staleness split and what TIS
did, in the summary and in the report; ``--classic`` gives the synchronous fp32 GRPO job."""

import json
import re
from pathlib import Path

import pytest

from tether.cli import main
from tether.train.config import DEFAULT_JOB, TrainConfig, default_job

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--steps", "3", "--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "6",
         "--warmstart-steps", "30", "--eval-size", "8", "--threads", "1", "--no-progress", "--reward-workers", "0"]


def documented_table() -> dict[str, tuple[str, str]]:
    """docs/default_job.md's table: field -> (default job, classic job), backticks stripped."""
    rows = {}
    for line in (ROOT / "docs" / "default_job.md").read_text().splitlines():
        m = re.fullmatch(r"\| `(\w+)` \| (.+?) \| (.+?) \|", line)
        if m:
            rows[m.group(1)] = tuple(v.strip("`") for v in m.group(2, 3))
    return rows


def _value(cfg: TrainConfig, field: str) -> str:
    """A field of the config as the docs' table writes it (an async field from the async section)."""
    owner = cfg.async_ if field in ("max_staleness", "old_logits") and cfg.async_ is not None else cfg
    v = getattr(owner, field)
    return str(getattr(v, "value", v))


def test_the_default_and_classic_configs_are_what_the_docs_say():
    table = documented_table()
    assert set(table) == set(DEFAULT_JOB), "docs/default_job.md's table and DEFAULT_JOB name different fields"
    default, classic = TrainConfig.default(), TrainConfig()
    for field, (job, plain) in table.items():
        assert _value(default, field) == job, field
        if field != "max_staleness":  # sync has no async section
            assert _value(classic, field) == plain, field
    assert classic.async_ is None and default.lag == 1


@pytest.mark.parametrize("given", [{"objective": "sapo"}, {"mode": "sync"}, {"mode": "async"}, {"model": "smollm2"},
                                   {"engine": "vllm"}, {"env": "frozenlake"}, {"bf16": True}, {"eval_every": 5}])
def test_a_flag_that_picks_its_own_job_turns_the_default_job_off(given):
    assert default_job(given) == {}


def test_other_flags_keep_the_default_job_under_them():
    assert default_job({"steps": 5, "model": "tiny", "bf16": "false"}) == DEFAULT_JOB
    cfg = TrainConfig.default(max_staleness=2, rollout_precision="bf16")
    assert cfg.lag == 2 and cfg.rollout_precision.value == "bf16" and cfg.objective == "tis"


def _parity_task(tmp_path: Path) -> list[str]:
    """A dataset whose reward (completion-length parity) varies inside groups even for a barely warm-started
    model, so every step updates the weights and the stale tokens' versions differ from the trainer's."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+1=", "answer": str(a + 1)}) + "\n" for a in range(100)))
    reward = tmp_path / "parity.py"
    reward.write_text("def parity(prompt, completion, answer):\n    return float(len(completion) % 2)\n")
    return ["--task", str(data), "--reward", f"{reward}:parity", "--lr", "1e-3"]


def test_a_short_default_run_shows_the_mismatch_its_parts_and_the_correction(tmp_path, capsys):
    out = tmp_path / "default"
    assert main(["train", *SMALL, *_parity_task(tmp_path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    end = printed[printed.index("tether train: "):]
    config = json.loads((out / "config.json").read_text())
    assert (config["mode"], config["max_staleness"], config["old_logits"], config["rollout_precision"],
            config["objective"]) == ("async", 1, "snapshot", "int8", "tis")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mismatch/engine"] > 1e-4 and summary["mismatch/staleness"] > 1e-4  # both real, not float noise
    shares = [summary[f"mismatch/{p}_share"] for p in ("engine", "staleness", "cross")]
    assert sum(shares) == pytest.approx(1.0, abs=1e-9) and shares[0] > 0 and shares[1] > 0
    assert 0 <= summary["correction/truncated_frac"] < 1
    assert 0 < summary["correction/ess_before"] <= 1 and 0 < summary["correction/ess_after"] <= 1
    assert "float noise" not in end and re.search(r"staleness [0-9.e-]+ nats/token", end), end
    sentence = re.search(r"of its variance (\d+) % engine, (\d+) % staleness, -?\d+ % cross term", end)
    assert sentence and int(sentence.group(1)) == round(100 * shares[0]), end
    assert re.search(r"correction tis: weight truncated on [0-9.e-]+ % of tokens, the other [0-9.]+ % reweighted "
                     r"by pi_old/mu; ESS per token [0-9.]+ before, [0-9.]+ after", end), end
    assert re.search(r"held-out accuracy \d+\.\d % -> \d+\.\d %", end), end
    assert main(["report", str(out)]) == 0
    result = re.search(r"<section id=result>(.*?)</section>", (out / "report.html").read_text(), re.S).group(1)
    assert sentence.group(0) in result and "correction tis: weight truncated on" in result
    assert "mode async" in result and "rollout precision int8" in result


def test_classic_gives_the_synchronous_fp32_grpo_job(tmp_path, capsys):
    """--classic is TrainConfig's own defaults, field for field (the job that was the default before issue 24)."""
    from tether.configs import to_dict

    out = tmp_path / "classic"
    assert main(["train", "--classic", *SMALL, "--steps", "1", "--out", str(out)]) == 0
    end = capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert (config["mode"], config["rollout_precision"], config["objective"]) == ("sync", "fp32", "grpo")
    assert config == to_dict(TrainConfig.from_flat(
        steps=1, prompts_per_step=4, group_size=4, max_new_tokens=6, warmstart_steps=30, eval_size=8, threads=1,
        progress=False, reward_workers=0, out=str(out)))
    assert "no mismatch beyond float noise" in end and "correction" not in end.split("tether train: ")[-1]
