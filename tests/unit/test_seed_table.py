"""The README's seed-method table (issue 19): every seed paper has a row, and every claim a row makes is checked.

A row's last cell starts with its status (``yes:``, ``partial:``, ``not yet: issue N``, ``out of scope:``) and
names things in backticks, each of one of three kinds, all checked here:

* a preset name (``ctpo``): registered in ``tether.objectives``;
* a path in the repository, optionally ``path::name`` with a ``def`` / ``class`` / assignment of ``name`` in it;
* a command, ``tether SUBCOMMAND ...``: parsed by tether's own parser (in-process, nothing runs), its config
  built with the same checks as a run (train, distill), every preset it names found in the registry and its
  ``--objective-args`` accepted by that preset.

Any other backticked text is an error, so nothing in the table goes unchecked. The mutation tests below make
sure the checker fails when a row is removed, a path is wrong or a flag is misspelt.
"""

from __future__ import annotations

import functools
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
N_PAPERS = 45
"""The numbered papers of methods.md's classification table (seed-papers.txt)."""
CATEGORIES = {"(a)", "(a)*", "(b)", "(c)", "(d)", "(e)", "(f)"}
OPEN_ISSUES = {14, 15, 16, 17, 18, 19, 20, 21, 23, 24}
"""The issues a "not yet" row may point to (open when the table was written)."""
STATUS = re.compile(r"^(yes|partial|not yet|out of scope):")
ISSUE = re.compile(r"issue (\d+)")


def seed_section(text: str) -> str:
    """The text of the ``## Seed methods`` section (up to the next ``## `` heading)."""
    m = re.search(r"^## Seed methods\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    if m is None:
        raise AssertionError("README.md has no '## Seed methods' section")
    return m.group(1)


def seed_rows(text: str) -> list[tuple[int, str, str, str]]:
    """``(number, paper, category, status)`` of every table row whose first cell is a number."""
    rows = []
    for line in seed_section(text).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) >= 4 and cells[0].isdigit():
            rows.append((int(cells[0]), cells[1], cells[2], "|".join(cells[3:])))
    return rows


def _defines(path: Path, name: str) -> bool:
    pattern = rf"^\s*(def|class)\s+{re.escape(name)}\b|^\s*{re.escape(name)}\s*[:=]"
    return re.search(pattern, path.read_text(), flags=re.M) is not None


def check_path(span: str) -> str | None:
    """None if ``span`` (``path`` or ``path::name``) exists (and defines ``name``); else the problem."""
    path, _, name = span.partition("::")
    p = ROOT / path
    if not p.exists():
        return f"path {path!r} does not exist"
    if name and not (p.is_file() and _defines(p, name)):
        return f"{path!r} defines no {name!r}"
    return None


def check_preset(span: str) -> str | None:
    """None if ``span`` is a registered objective preset; else the problem."""
    from tether.objectives import get_preset

    try:
        get_preset(span)
    except (ValueError, KeyError) as e:
        return f"{span!r} is not a preset: {e}"
    return None


@functools.cache  # pure in the span; the mutation tests re-check the whole table
def check_command(span: str) -> str | None:
    """None if ``span`` (``tether SUB ...``) parses and names only known presets; else the problem."""
    from tether.cli import parse
    from tether.configs import config_from_args
    from tether.objectives import get_preset

    argv = shlex.split(span)[1:]
    try:
        args = parse(argv)
    except SystemExit:
        return f"tether's parser refuses {span!r}"
    try:
        if args.command == "train":
            from tether.commands.train import train_config

            cfg = train_config(args)  # exactly the config `tether train` would run (default job, algorithm)
            get_preset(cfg.objective).resolve(cfg.objective_args)
        elif args.command == "distill":
            from tether.distill.config import DEFAULT_OBJECTIVE, DistillConfig

            cfg = config_from_args(DistillConfig, args)
            get_preset(cfg.objective or DEFAULT_OBJECTIVE[cfg.algorithm]).resolve(cfg.objective_args)
        elif args.command == "lab":
            for name in (args.objectives or "").split(","):
                get_preset(name)
    except (ValueError, KeyError) as e:
        return f"{span!r}: {e}"
    return None


def row_problems(number: int, category: str, status: str) -> list[str]:
    out = []
    where = f"row {number}"
    if category not in CATEGORIES:
        out.append(f"{where}: category {category!r} is not one of {sorted(CATEGORIES)}")
    m = STATUS.match(status)
    if m is None:
        return out + [f"{where}: the status must start with yes:, partial:, not yet: or out of scope:"]
    kind = m.group(1)
    spans = re.findall(r"`([^`]+)`", status)
    commands = [s for s in spans if s.startswith("tether ")]
    if kind in ("yes", "partial") and not commands:
        out.append(f"{where}: a '{kind}' row names a command that runs it")
    if kind in ("partial", "not yet"):
        issues = [int(n) for n in ISSUE.findall(status)]
        if not issues or any(n not in OPEN_ISSUES for n in issues):
            out.append(f"{where}: a '{kind}' row names the open issue that covers the rest ({sorted(OPEN_ISSUES)})")
    for span in spans:
        if span in commands:
            problem = check_command(span)
        elif "/" in span.partition("::")[0]:
            problem = check_path(span)
        elif re.fullmatch(r"[a-z][a-z0-9_]*", span):
            problem = check_preset(span)
        else:
            problem = f"{span!r} is neither a preset, a repository path nor a `tether ...` command"
        if problem:
            out.append(f"{where}: {problem}")
    return out


def table_problems(text: str) -> list[str]:
    """Every problem of the seed table in ``text`` (README.md's contents); empty when it is right."""
    rows = seed_rows(text)
    numbers = [r[0] for r in rows]
    out = [f"paper {n} has no row" for n in range(1, N_PAPERS + 1) if n not in numbers]
    out += [f"paper {n} has {numbers.count(n)} rows" for n in sorted(set(numbers)) if numbers.count(n) > 1]
    out += [f"row {n} is not a seed paper (1..{N_PAPERS})" for n in numbers if not 1 <= n <= N_PAPERS]
    for number, _, category, status in rows:
        out += row_problems(number, category, status)
    return out


@pytest.fixture(scope="module")
def readme() -> str:
    return README.read_text()


def test_every_seed_paper_has_one_checked_row(readme):
    assert table_problems(readme) == []


def test_the_table_says_where_each_implemented_paper_lives(readme):
    rows = seed_rows(readme)
    kinds = {STATUS.match(s).group(1) for _, _, _, s in rows}
    assert kinds == {"yes", "partial", "not yet", "out of scope"}
    assert all(s.startswith("out of scope:") for _, _, c, s in rows if c == "(f)")  # the non-language-model papers


def _mutate_row(text: str, number: int, new_line: str | None) -> str:
    lines = text.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith(f"| {number} |"))
    lines[i:i + 1] = [] if new_line is None else [new_line]
    return "\n".join(lines) + "\n"


def test_a_removed_row_is_caught(readme):
    assert table_problems(_mutate_row(readme, 24, None)) == ["paper 24 has no row"]


def test_a_duplicated_row_is_caught(readme):
    row = next(line for line in readme.splitlines() if line.startswith("| 10 |"))
    assert table_problems(_mutate_row(readme, 10, row + "\n" + row)) == ["paper 10 has 2 rows"]


@pytest.mark.parametrize("bad, expected", [
    ("yes: `tether train --objective ctpo` (`tether/objectives/no_such_file.py`)", "does not exist"),
    ("yes: `tether train --objective ctpo` (`tether/objectives/sequence_ratio.py::no_such_fn`)", "defines no"),
    ("yes: `tether train --objective no_such_preset`", "no_such_preset"),
    ("yes: `tether train --objective ctpo --no-such-flag 1`", "parser refuses"),
    ("yes: `tether train --objective tis --objective-args '{\"capp\": 1.0}'`", "no hyper-parameter 'capp'"),
    ("yes: `tether distill --algorithm nope`", "parser refuses"),
    ("yes: `tether lab --objectives ctpo,nope`", "nope"),
    ("yes: `tether train --objective ctpo`, also `ctpo_nope`", "not a preset"),
    ("yes: `tether train --objective ctpo` in `Some Thing`", "neither a preset"),
    ("yes: see `tether/objectives/sequence_ratio.py`", "names a command"),
    ("not yet: later", "open issue"),
    ("maybe: one day", "status must start"),
])
def test_a_wrong_claim_is_caught(readme, bad, expected):
    problems = table_problems(_mutate_row(readme, 24, f"| 24 | CTPO | (a) | {bad} |"))
    assert len(problems) == 1 and expected in problems[0], problems
