"""The ``tether`` command. Each subcommand is a module in ``tether.commands`` that defines
``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``; a new command is a new file.

Start-up is lazy: a command module imports only the standard library at its top, and only the chosen
subcommand's ``add_arguments`` runs (``tether --help`` and ``tether objectives`` import no torch). Typos
are caught: flag prefixes are not accepted (``allow_abbrev=False`` everywhere), and an unknown flag or
subcommand is an error with a "did you mean" in the subcommand's own usage."""

from __future__ import annotations

import argparse
import difflib
import importlib
import pkgutil
import sys
from types import ModuleType

import tether.commands as commands_pkg


def command_modules() -> dict[str, ModuleType]:
    """``{NAME: module}`` of every subcommand (modules whose name starts with ``_`` are helpers)."""
    mods = (importlib.import_module(f"{commands_pkg.__name__}.{info.name}")
            for info in sorted(pkgutil.iter_modules(commands_pkg.__path__), key=lambda i: i.name)
            if not info.name.startswith("_"))
    return {m.NAME: m for m in mods}


def _chosen(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is not an option), if any."""
    return next((a for a in argv if not a.startswith("-")), None)


def _parsers(argv: list[str] | None) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="tether", description="RL post-training that measures and corrects policy mismatch.", allow_abbrev=False
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = None if argv is None else _chosen(argv)
    subparsers = {}
    for name, module in command_modules().items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP, allow_abbrev=False)
        if argv is None or name == chosen:  # the others' flags are never needed (and may import torch)
            module.add_arguments(p)
            if p.format_usage().count("\n") > 3:  # dozens of flags: a usage line an error can show
                p.usage = "%(prog)s [OPTIONS]   (`%(prog)s --help` lists every option)"
        p.set_defaults(_run=module.run)
        subparsers[name] = p
    return parser, subparsers


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with ``argv``, only the subcommand it names gets its flags."""
    return _parsers(argv)[0]


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.75)
    return f" (did you mean '{close[0]}'?)" if close else ""


def parse(argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed; an unknown subcommand or flag exits 2 with a "did you mean" and the right usage."""
    parser, subparsers = _parsers(argv)
    chosen = _chosen(argv)
    if chosen is not None and chosen not in subparsers:
        parser.error(f"unknown command '{chosen}'{_did_you_mean(chosen, list(subparsers))}")
    args, extra = parser.parse_known_args(argv)
    if extra:
        target = subparsers.get(getattr(args, "command", None) or "", parser)
        flags = [s for a in target._actions for s in a.option_strings if s.startswith("--")]
        words = []
        for a in extra:
            flag = a.split("=", 1)[0]
            words.append(f"'{a}'{_did_you_mean(flag, flags)}" if a.startswith("-") else f"'{a}'")
        target.error(f"unrecognized argument(s): {', '.join(words)}")
    return args


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the console command, not a library call: a faster malloc if installed (allocator.py)
        from tether.allocator import reexec_with_fast_malloc

        reexec_with_fast_malloc(sys.argv[1:])
        argv = sys.argv[1:]
    args = parse(list(argv))
    if getattr(args, "_run", None) is None:
        build_parser([]).print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # user errors: a clear message, no traceback
        print(f"tether {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
