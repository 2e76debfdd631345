"""``tether objectives``: list the objective presets."""

from __future__ import annotations

import argparse

NAME = "objectives"
HELP = "List the objective presets (name and one-line description)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="show one preset in full (defaults, equation, source)")
    p.add_argument("--markdown", action="store_true", help="print every preset as Markdown (docs/objectives.md)")


def run(args: argparse.Namespace) -> int:
    from tether.objectives import get_preset, presets

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
    items = presets()
    width = max(len(n) for n in items)
    for name in sorted(items):
        print(f"{name:<{width}}  {items[name].description}")
    return 0
