"""JSON Lines read one line at a time, for every .jsonl input (corpora, conversations, HellaSwag):
blank lines skipped, and each error one line that names the file and the line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gptlab.errors import UserError


def rows(path: str | Path, what: str = "JSON Lines file", skip: int = 0) -> Iterator[tuple[str, Any]]:
    """(where, value) for each non-blank line of `path`, where = "PATH:LINE". The first `skip`
    non-blank lines are passed over unparsed. `what` names the file in errors ("no such {what}")."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise UserError(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not a {what}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror or e}") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            if skip:
                skip -= 1
                continue
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg})") from None


def count(path: str | Path, what: str = "JSON Lines file") -> int:
    """The number of non-blank lines (nothing parsed)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return sum(1 for raw in f if raw.strip())
    except FileNotFoundError:
        raise UserError(f"{path}: no such {what}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror or e}") from None
