"""Row readers for dataset files, one function per format, keyed by file suffix.

A reader turns a file into ``RawRow`` records (1-based line number + the row as a dict, or the reason
the row could not be read) and never raises on a bad row: validation and the skip/raise decision
live in ``tether.tasks.jsonl``. To support a new format (Parquet, ...), write ``read_<format>(path)``
yielding ``RawRow`` and add it to ``READERS``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RawRow:
    line: int
    """1-based line of the file where the row starts (CSV: the record's first physical line)."""
    data: dict | None
    """The row's fields, or None when the row could not be read (see ``error``)."""
    error: tuple[str, str] | None = None
    """(reason kind, message) when unreadable: 'invalid_utf8', 'invalid_json', 'not_object', 'bad_columns'."""


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def read_jsonl(path: Path) -> Iterator[RawRow]:
    """One JSON object per line. Blank (whitespace-only) lines are not rows and are passed over."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield RawRow(line_no, None, ("invalid_utf8", f"not valid UTF-8 (byte {e.start + 1} of the line)"))
                continue
            text = text.rstrip("\r\n")
            if line_no == 1 and text.startswith("\ufeff"):
                text = text[1:]
            if not text.strip():
                continue
            try:
                value = json.loads(text, parse_constant=_reject_constant)
            except json.JSONDecodeError as e:
                yield RawRow(line_no, None, ("invalid_json", f"invalid JSON: {e.msg} at column {e.colno}"))
                continue
            except ValueError as e:
                yield RawRow(line_no, None, ("invalid_json", f"invalid JSON: {e}"))
                continue
            if not isinstance(value, dict):
                yield RawRow(line_no, None, ("not_object", f"expected a JSON object, got {_json_type(value)}"))
                continue
            yield RawRow(line_no, value)


def _json_type(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def read_csv(path: Path) -> Iterator[RawRow]:
    """A header line naming the columns, then one record per row (RFC 4180 quoting; a quoted field
    may span lines). Every value is a string; an empty cell is an empty string."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line_no = data.count(b"\n", 0, e.start) + 1
        yield RawRow(line_no, None, ("invalid_utf8", f"not valid UTF-8 (byte offset {e.start} of the file); the file cannot be read"))
        return
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        yield RawRow(1, None, ("bad_columns", f"unreadable CSV header: {e}"))
        return
    start = reader.line_num + 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield RawRow(start, None, ("bad_columns", f"unreadable CSV record: {e}"))
            return
        if not cells or all(not c.strip() for c in cells) and len(cells) <= 1:
            start = reader.line_num + 1
            continue
        if len(cells) > len(header):
            yield RawRow(start, None, ("bad_columns", f"{len(cells)} columns but the header has {len(header)}"))
        else:
            yield RawRow(start, dict(zip(header, cells)))
        start = reader.line_num + 1


def read_parquet(path: Path) -> Iterator[RawRow]:
    """One row per Parquet record (``line`` is the 1-based row number). Needs pyarrow (the
    ``parquet`` extra)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow is in the parquet extra
        raise ValueError(f"{path}: reading Parquet needs pyarrow: pip install 'tether[parquet]'") from e
    try:
        table = pq.read_table(path)
    except Exception as e:  # a corrupt or non-Parquet file
        yield RawRow(1, None, ("bad_columns", f"unreadable Parquet file: {type(e).__name__}: {e}"))
        return
    for i, row in enumerate(table.to_pylist(), start=1):
        yield RawRow(i, row)


READERS: dict[str, Callable[[Path], Iterator[RawRow]]] = {
    ".jsonl": read_jsonl,
    ".csv": read_csv,
    ".parquet": read_parquet,
}


def reader_for(path: Path) -> Callable[[Path], Iterator[RawRow]]:
    suffix = Path(path).suffix.lower()
    if suffix not in READERS:
        raise ValueError(
            f"{path}: unsupported dataset format {suffix or '(no suffix)'!r}; supported: {', '.join(sorted(READERS))}"
        )
    return READERS[suffix]
