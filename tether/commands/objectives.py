"""``tether objectives``: list the objective presets.

The list (names and one-line descriptions) is read from ``tether.commands._presets``, a table generated from
the registry by ``render_catalogue()``, so listing them starts no torch (four seconds of start-up); a unit test
fails when the table and the registry differ. ``tether objectives NAME`` and ``--markdown`` load the registry."""

from __future__ import annotations

import argparse

NAME = "objectives"
HELP = "List the objective presets (name and one-line description)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="show one preset in full (defaults, equation, source)")
    p.add_argument("--markdown", action="store_true", help="print every preset as Markdown (docs/objectives.md)")


def render_catalogue() -> str:
    """The source of ``tether/commands/_presets.py`` from the registry (write it after adding a preset)."""
    from tether.objectives import presets

    rows = "".join(f"    ({name!r}, {p.description!r}),\n" for name, p in sorted(presets().items()))
    return ('"""The objective presets listed by `tether objectives`, generated from the registry by '
            '`tether.commands.objectives.render_catalogue()`: do not edit."""\n\nPRESETS = (\n' + rows + ")\n")


def run(args: argparse.Namespace) -> int:
    if not args.name and not args.markdown:
        from tether.commands._presets import PRESETS

        width = max(len(n) for n, _ in PRESETS)
        for name, description in PRESETS:
            print(f"{name:<{width}}  {description}")
        return 0
    from tether.objectives import get_preset

    if args.markdown:
        from tether.objectives.docs import render_markdown

        print(render_markdown(), end="")
        return 0
    if args.name:
        p = get_preset(args.name)
        print(f"{p.name}: {p.description}")
        print(f"  loss:      {p.equation}")
        print(f"  advantage: {p.advantage}")
        print(f"  defaults:  {', '.join(f'{k}={v}' for k, v in p.defaults.items())}")
        if p.requires:
            print(f"  requires:  {', '.join(p.requires)}")
        print(f"  source:    {p.source}")
        return 0
