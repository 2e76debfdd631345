"""Layering rules, checked on the source with ``ast`` (nothing is imported): a lower layer never
imports an upper one, so it can be used, tested and replaced alone. Imports inside functions count."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "tether"

FORBIDDEN = {
    "engine": ("tether.train", "tether.distill", "tether.commands", "tether.cli"),
}
"""layer (a folder of tether/) -> the modules none of its files may import (the layers above it)."""


def imported_modules(path: Path, root: Path = PACKAGE) -> set[str]:
    """Every module ``path`` (a file under the package folder ``root``) imports, absolute (relative
    imports resolved; ``from a import b`` gives both ``a`` and ``a.b``, since ``b`` may be a module)."""
    package = list(path.relative_to(root.parent).with_suffix("").parts[:-1])
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            out.add(module)
            out.update(f"{module}.{alias.name}" for alias in node.names)
    return out


def violations(layer: str, root: Path = PACKAGE) -> list[str]:
    """``"FILE imports MODULE"`` for every forbidden import in the layer's files."""
    bad = []
    for path in sorted((root / layer).rglob("*.py")):
        for module in sorted(imported_modules(path, root)):
            if any(module == f or module.startswith(f + ".") for f in FORBIDDEN[layer]):
                bad.append(f"{path.relative_to(root.parent)} imports {module}")
    return bad


@pytest.mark.parametrize("layer", list(FORBIDDEN))
def test_layer_imports_nothing_above_it(layer):
    assert violations(layer) == []


def test_the_import_parser_sees_every_form(tmp_path):
    """The rule above can fail: each import form of an upper layer is found (absolute, from-import of a
    module, relative, inside a function), and imports of the layer itself or below are not."""
    root = tmp_path / "tether"
    layer = root / "engine"
    layer.mkdir(parents=True)
    (layer / "a.py").write_text("import tether.train.config\n")
    (layer / "b.py").write_text("from tether import train\n")
    (layer / "c.py").write_text("from ..train.config import TrainConfig\n")
    (layer / "d.py").write_text("def f():\n    from tether.distill import loop\n")
    (layer / "e.py").write_text("from tether.rollout import Rollout\nfrom . import sampling\nimport torch\n")
    found = violations("engine", root)
    assert found == ["tether/engine/a.py imports tether.train.config", "tether/engine/b.py imports tether.train", "tether/engine/c.py imports tether.train.config",
                     "tether/engine/c.py imports tether.train.config.TrainConfig",
                     "tether/engine/d.py imports tether.distill", "tether/engine/d.py imports tether.distill.loop"]
    assert imported_modules(layer / "e.py", root) == {"tether.rollout", "tether.rollout.Rollout", "tether.engine",
                                                      "tether.engine.sampling", "torch"}


def test_engine_enums_live_in_the_engine_and_stay_importable_from_the_config():
    from tether.engine import kinds
    from tether.train import config

    assert config.EngineKind is kinds.EngineKind and config.RolloutPrecision is kinds.RolloutPrecision
