"""The CLI catches typos (issue 20 item 6): a misspelt flag, subcommand or config-file key gets a "did you mean",
the usage shown is the subcommand's, prefixes of flags are refused, and start-up imports no torch for
`tether --help` and `tether objectives`."""

import argparse
import sys

import pytest

from tests.processes import run as run_child
from tests.processes import tether_env
from tether.cli import build_parser, main

pytestmark = pytest.mark.unit


def _fails(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_misspelt_flag_gets_did_you_mean_in_the_subcommands_usage(capsys):
    err = _fails(capsys, ["train", "--setps", "3"])
    assert "did you mean '--steps'?" in err
    assert err.startswith("usage: tether train ") and "tether train: error:" in err
    err = _fails(capsys, ["train", "--bogus-flag"])
    assert "'--bogus-flag'" in err and "did you mean" not in err  # nothing close: no guess
    err = _fails(capsys, ["objectives", "--markdwn"])
    assert err.startswith("usage: tether objectives ") and "did you mean '--markdown'?" in err


@pytest.mark.parametrize("argv", [["train", "--step", "3"], ["train", "--no-prog"], ["lab", "--mis", "noise"],
                                  ["meter", "x.jsonl", "--js"]])
def test_flag_prefixes_are_refused(capsys, argv):
    err = _fails(capsys, argv)
    assert "unrecognized argument(s)" in err and f"'{argv[1 if argv[0] != 'meter' else 2]}'" in err


def test_every_parser_refuses_abbreviations():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert parser.allow_abbrev is False
    assert sub.choices and all(p.allow_abbrev is False for p in sub.choices.values())


def test_misspelt_subcommand_gets_did_you_mean(capsys):
    err = _fails(capsys, ["trian"])
    assert "unknown command 'trian' (did you mean 'train'?)" in err and err.startswith("usage: tether ")


@pytest.mark.parametrize("key,hint", [("setps", "did you mean 'steps'?"),
                                      ("learning_rate", "did you mean 'lr'? tether's name for it"),
                                      ("objectve", "did you mean 'objective'?")])
def test_misspelt_config_file_key_gets_did_you_mean(tmp_path, capsys, key, hint):
    f = tmp_path / "c.toml"
    f.write_text(f"{key} = 3\n")
    assert main(["train", "--config", str(f), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"'{key}' ({hint})" in err and str(f) in err
    assert not (tmp_path / "run").exists()  # refused before any work


PROBE = """
import sys
from tether.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("TORCH-IMPORTED" if "torch" in sys.modules else "NO-TORCH", file=sys.stderr)
"""


@pytest.mark.parametrize("argv,want", [(["--help"], "train"), (["objectives"], "grpo"), (["trian"], "train")])
def test_start_up_imports_no_torch_for_help_and_listing(argv, want):
    proc = run_child([sys.executable, "-c", PROBE, *argv], env=tether_env(), timeout=60)
    assert proc.stderr.strip().endswith("NO-TORCH"), proc.stderr[-2000:]
    assert want in proc.stdout + proc.stderr


def test_the_probe_sees_torch_when_a_command_needs_it():
    proc = run_child([sys.executable, "-c", PROBE, "train", "--help"], env=tether_env(), timeout=60)
    assert proc.stderr.strip().endswith("TORCH-IMPORTED"), proc.stderr[-2000:]


def test_objectives_listing_matches_the_registry(capsys):
    from pathlib import Path

    import tether.commands as pkg
    from tether.commands.objectives import render_catalogue
    from tether.objectives import presets

    assert (Path(pkg.__file__).parent / "_presets.py").read_text() == render_catalogue(), (
        "tether/commands/_presets.py is out of date: write render_catalogue() into it")
    assert main(["objectives"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == sorted(presets())
