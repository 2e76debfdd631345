"""Package-level guarantees of tether.objectives: imports, registry, generated docs, CLI."""

import sys
from pathlib import Path

import pytest

from tests.processes import run, tether_command
from tether.objectives import presets
from tether.objectives.docs import render_markdown

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]

REQUIRED = [
    "reinforce", "ppo", "grpo", "dr_grpo", "dapo", "gspo", "cispo", "topr", "dppo", "tis", "icepop", "mis",
    "ctpo", "ctpo_geomean", "p3o", "p4o", "decoupled_ppo", "ppo_ewma", "calibrl", "rl_plus",
]


def test_objectives_import_only_torch():
    code = (
        "import sys, torch; before = set(sys.modules);"
        "import tether.objectives as o; o.presets();"
        "new = {m.split('.')[0] for m in set(sys.modules) - before};"
        "bad = sorted(new - {'tether'} - set(sys.stdlib_module_names));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = run([sys.executable, "-c", code])
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_required_preset_is_registered():
    missing = [n for n in REQUIRED if n not in presets()]
    assert not missing, f"missing presets: {missing}"


def test_every_preset_documents_itself():
    for name, p in presets().items():
        assert p.description and p.equation and p.source, name
        assert "agg" in p.defaults, name


def test_docs_objectives_md_is_generated_from_registry():
    committed = (ROOT / "docs" / "objectives.md").read_text()
    assert committed == render_markdown(), "regenerate: tether objectives --markdown > docs/objectives.md"


def test_cli_lists_presets_and_rejects_unknown():
    r = run(tether_command("objectives"))
    assert r.returncode == 0
    listed = {line.split()[0] for line in r.stdout.splitlines() if line.strip()}
    assert set(presets()) == listed
    r = run(tether_command("objectives", "nope"))
    assert r.returncode == 2 and "valid objectives" in r.stderr and "grpo" in r.stderr
