"""`tether meter FILE`: the summary equals measure() on the same tensors; bad input names file, line, column."""

from __future__ import annotations

import json
import random

import pytest
import torch

from tether.cli import main
from tether.meter import measure, to_floats
from tether.meter.dump import read_dump

pytestmark = pytest.mark.unit


def _records(n=12, seed=0, with_versions=True):
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        L = rng.randint(1, 20)
        mu = [-rng.random() * 3 for _ in range(L)]
        old = [x + rng.gauss(0, 0.1) for x in mu]
        rec = {"logp_mu": mu, "logp_old": old, "mask": [int(rng.random() > 0.2) for _ in range(L)]}
        if with_versions:
            rec["version"] = [4 + (i % 2)] * L
        recs.append(rec)
    return recs


def _write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_json_summary_equals_measure_on_the_same_tensors(tmp_path, capsys):
    recs = _records()
    f = _write_jsonl(tmp_path / "dump.jsonl", recs)
    assert main(["meter", str(f), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    B, T = len(recs), max(len(r["logp_mu"]) for r in recs)
    mu, old = torch.zeros(B, T, dtype=torch.float64), torch.zeros(B, T, dtype=torch.float64)
    mask, ver = torch.zeros(B, T, dtype=torch.bool), torch.full((B, T), -1)
    for b, r in enumerate(recs):
        L = len(r["logp_mu"])
        mu[b, :L], old[b, :L] = torch.tensor(r["logp_mu"], dtype=torch.float64), torch.tensor(r["logp_old"], dtype=torch.float64)
        mask[b, :L], ver[b, :L] = torch.tensor(r["mask"]).bool(), torch.tensor(r["version"])
    ref = to_floats(measure(mask_BT=mask, logp_old_BT=old, logp_mu_BT=mu, version_BT=ver, current_version=5))
    for k in ("meter/total/ess_seq", "meter/total/logr_p99", "meter/engine/kl_k3", "meter/version/stale_frac"):
        assert out[k] == pytest.approx(ref[k], rel=1e-12), k
    # stale tokens (version 4 < 5) and no logp_behave_old: the decomposition says why it is missing
    assert "older version" in out["meter/decomp/unavailable"]
    assert out["meter/auto/level"] in {"token", "sequence", "geometric"}


def test_table_output(tmp_path, capsys):
    f = _write_jsonl(tmp_path / "dump.jsonl", _records(with_versions=False))
    assert main(["meter", str(f)]) == 0
    out = capsys.readouterr().out
    assert "ESS sequence (product)" in out and "engine" in out and "suggested correction" in out


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r.pop("logp_old"), "dump.jsonl:3: missing column 'logp_old'"),
        (lambda r: r.update(logp_mu="oops"), "dump.jsonl:3: column 'logp_mu' must be a list"),
        (lambda r: r["logp_old"].__setitem__(0, "x"), "dump.jsonl:3: column 'logp_old' entry 0 must be a number"),
        (lambda r: r["logp_old"].append(0.0), "dump.jsonl:3: column 'logp_old' has"),
        (lambda r: r["mask"].__setitem__(0, 2), "dump.jsonl:3: column 'mask' entry 0 must be 0 or 1"),
        (lambda r: r.pop("version"), "dump.jsonl:3: missing column 'version'"),
    ],
)
def test_bad_input_names_file_line_and_column(tmp_path, capsys, mutate, message):
    recs = _records()
    mutate(recs[2])
    f = _write_jsonl(tmp_path / "dump.jsonl", recs)
    assert main(["meter", str(f)]) == 2
    assert message in capsys.readouterr().err


def test_current_version_older_than_the_data_is_an_error(tmp_path, capsys):
    f = _write_jsonl(tmp_path / "dump.jsonl", _records())
    assert main(["meter", str(f), "--current-version", "4"]) == 2
    assert "older than the newest token version 5" in capsys.readouterr().err
    assert main(["meter", str(f), "--current-version", "7", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["meter/version/age_max"] == 3.0


def test_invalid_json_empty_and_missing_file(tmp_path, capsys):
    f = tmp_path / "dump.jsonl"
    f.write_text(json.dumps(_records(1)[0]) + "\n{not json\n")
    assert main(["meter", str(f)]) == 2
    assert "dump.jsonl:2: invalid JSON" in capsys.readouterr().err
    f.write_text("\n")
    assert main(["meter", str(f)]) == 2
    assert "no sequences" in capsys.readouterr().err
    assert main(["meter", str(tmp_path / "absent.jsonl")]) == 2
    assert "absent.jsonl" in capsys.readouterr().err


def test_parquet_round_trip_and_row_errors(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    recs = _records()
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "dump.parquet")
    _write_jsonl(tmp_path / "dump.jsonl", recs)
    a, b = read_dump(tmp_path / "dump.parquet"), read_dump(tmp_path / "dump.jsonl")
    assert torch.equal(a.mask_BT, b.mask_BT) and torch.equal(a.logp_old_BT, b.logp_old_BT)
    assert torch.equal(a.version_BT, b.version_BT)
    recs[4]["logp_old"] = recs[4]["logp_old"][:-1] + [0.0, 0.0]
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "bad.parquet")
    assert main(["meter", str(tmp_path / "bad.parquet")]) == 2
    assert "bad.parquet row 4: column 'logp_old' has" in capsys.readouterr().err


@pytest.mark.parametrize("names", [
    {"logp_mu": "rollout_log_probs", "logp_old": "old_log_probs", "mask": "response_mask"},  # verl
    {"logp_mu": "sampling_per_token_logps", "logp_old": "old_per_token_logps", "mask": "completion_mask"},  # TRL
])
def test_peer_tensor_names_are_read_as_aliases(tmp_path, names):
    recs = _records(with_versions=False)
    renamed = [{names[k]: v for k, v in r.items()} for r in recs]
    ours = read_dump(_write_jsonl(tmp_path / "ours.jsonl", recs))
    theirs = read_dump(_write_jsonl(tmp_path / "theirs.jsonl", renamed))
    for field in ("mask_BT", "logp_mu_BT", "logp_old_BT"):
        assert torch.equal(getattr(theirs, field), getattr(ours, field)), field
    assert not theirs.mask_BT.all()  # the mask column was read (not defaulted to ones)


def test_columns_mapping_reads_any_names(tmp_path, capsys):
    recs = _records(with_versions=False)
    renamed = [{"vllm_lp": r["logp_mu"], "actor_lp": r["logp_old"], "keep": r["mask"]} for r in recs]
    f = _write_jsonl(tmp_path / "custom.jsonl", renamed)
    assert main(["meter", str(f), "--json", "--columns", "logp_mu=vllm_lp, logp_old=actor_lp,mask=keep"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert main(["meter", str(_write_jsonl(tmp_path / "ours.jsonl", recs)), "--json"]) == 0
    ref = json.loads(capsys.readouterr().out)
    assert out == ref


@pytest.mark.parametrize("spec, message", [
    ("logp_mu", "expected TETHER=FILE pairs"),
    ("logp_muu=x", "unknown tether column 'logp_muu'; valid: logp_mu, logp_old"),
    ("logp_mu=a,logp_mu=b", "mapped twice"),
    ("logp_mu=absent", "dump.jsonl:1: missing column 'absent' (mapped to 'logp_mu' by --columns"),
])
def test_bad_columns_mapping_names_the_problem(tmp_path, capsys, spec, message):
    f = _write_jsonl(tmp_path / "dump.jsonl", _records(n=2, with_versions=False))
    assert main(["meter", str(f), "--columns", spec]) == 2
    assert message in capsys.readouterr().err


def test_two_aliases_of_one_column_are_ambiguous(tmp_path, capsys):
    recs = [{"rollout_log_probs": r["logp_mu"], "sampling_per_token_logps": r["logp_mu"], "logp_old": r["logp_old"]}
            for r in _records(n=2, with_versions=False)]
    f = _write_jsonl(tmp_path / "dump.jsonl", recs)
    assert main(["meter", str(f)]) == 2
    assert "are both aliases of 'logp_mu'; choose one with --columns logp_mu=NAME" in capsys.readouterr().err


def test_peer_logs_are_shown_beside_tethers(tmp_path, capsys):
    """TRL's trainer_state.json (sampling/*) and verl's file-logger JSONL (rollout_corr/*): each key's mean,
    last value and step count, in the JSON and in the table."""
    dump = _write_jsonl(tmp_path / "dump.jsonl", _records(with_versions=False))
    trl_state = tmp_path / "trainer_state.json"
    trl_state.write_text(json.dumps({"log_history": [
        {"step": 1, "loss": 0.1, "sampling/importance_sampling_ratio/mean": 0.9},
        {"step": 2, "sampling/importance_sampling_ratio/mean": 1.1, "sampling/sampling_logp_difference/max": 0.5},
        {"step": 3, "train_runtime": 9.0},
    ]}))
    assert main(["meter", str(dump), "--json", "--peer-log", str(trl_state)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["peer/sampling/importance_sampling_ratio/mean/mean"] == pytest.approx(1.0)
    assert out["peer/sampling/importance_sampling_ratio/mean/last"] == 1.1
    assert out["peer/sampling/importance_sampling_ratio/mean/n"] == 2
    assert out["peer/sampling/sampling_logp_difference/max/n"] == 1
    assert not any(k.startswith("peer/loss") for k in out)
    verl_log = tmp_path / "verl.jsonl"
    verl_log.write_text("".join(json.dumps({"step": s, "data": {"rollout_corr/rollout_is_mean": v, "actor/pg_loss": 1}})
                                + "\n" for s, v in ((1, 0.8), (2, 1.0), (3, None))))
    assert main(["meter", str(dump), "--peer-log", str(verl_log)]) == 0
    table = capsys.readouterr().out
    assert "rollout_corr/rollout_is_mean" in table and "0.9" in table and "ESS token" in table
    assert "actor/pg_loss" not in table


def test_a_peer_log_without_mismatch_scalars_says_why(tmp_path, capsys):
    dump = _write_jsonl(tmp_path / "dump.jsonl", _records(n=2, with_versions=False))
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"loss": 1.0}) + "\n{bad\n")
    assert main(["meter", str(dump), "--peer-log", str(log)]) == 2
    assert "log.jsonl:2: invalid JSON" in capsys.readouterr().err
    log.write_text(json.dumps({"loss": 1.0}) + "\n")
    assert main(["meter", str(dump), "--peer-log", str(log)]) == 2
    assert "no sampling/* or rollout_corr/* scalars" in capsys.readouterr().err
