"""Rows of a JSON or JSON Lines file: the one reader for training data, eval data and the MoE
routing report.

Parsed with the json module rather than `datasets`: Arrow needs one schema per column, so a
single malformed row (a conversation that is a string, a number where text belongs) makes
`datasets` fail the whole file with an error that names neither file nor line. Here each row
stays a Python object (the caller judges it) and a broken line is reported with its number.

What a file may hold, one rule for every caller:
  - `.jsonl`: one row per line (blank lines skipped);
  - anything else: a JSON list of rows, or an object holding exactly one list (a `{"rows": [...]}`
    or `{"data": [...]}` wrapper) whose list is the rows, or rows one per line (JSON Lines saved
    under another name, e.g. `.json`).
A UTF-8 byte order mark is accepted. Every message names what was read (`what`: "data",
"eval data", "report data") and the file; invalid JSON also its line and column.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from finetune.errors import UsageError
from finetune.resources import read_user_text


@dataclass
class Rows:
    """Raw rows with where each came from ('file.jsonl line 7'), and rows lost before parsing."""

    rows: list = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    broken: list[tuple[str, str]] = field(default_factory=list)  # (where, message): unparseable JSONL lines


def _invalid(what: str, path: Path, e: json.JSONDecodeError, line: Optional[int] = None) -> UsageError:
    return UsageError(f"{what} {path} line {line or e.lineno} col {e.colno}: invalid JSON ({e.msg})")


def _read_lines(path: Path, text: str, what: str, out: Rows, strict: bool) -> None:
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if strict:
                raise _invalid(what, path, e, n) from None
            out.broken.append((f"{path} line {n}", e.msg))
            continue
        out.rows.append(row)
        out.where.append(f"{path} line {n}")


def _unwrap(data: Any, path: Path, what: str) -> list:
    """A parsed JSON document -> its rows: a list as it is, an object holding exactly one list
    -> that list; anything else is refused in one line."""
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1:
            return lists[0]
    if not isinstance(data, list):
        got = "an object" if isinstance(data, dict) else type(data).__name__
        raise UsageError(f"{what} {path}: expected a JSON list of rows (or an object holding one list), got {got}")
    return data


def read_json_rows(path: Path, what: str, out: Optional[Rows] = None, strict: bool = True) -> Rows:
    """The rows of one JSON or JSON Lines file (module doc), appended to `out` (a new Rows if
    None). strict=False keeps going past a broken JSON Lines line and records it in `out.broken`
    (training data counts them); strict=True refuses it, naming the line."""
    path = Path(path)
    out = Rows() if out is None else out
    text = read_user_text(path, what)
    if path.suffix.lower() == ".jsonl":
        _read_lines(path, text, what, out, strict)
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            _read_lines(path, text, what, out, strict)  # JSON Lines saved as .json
            return out
        raise _invalid(what, path, e) from None
    rows = _unwrap(data, path, what)
    out.rows.extend(rows)
    out.where.extend(f"{path} row {i + 1}" for i in range(len(rows)))
    return out
