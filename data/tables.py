"""Any table as a classification data set: ``csv:``, ``tsv:`` and ``jsonl:``.

Columns are named by the options (``--text-column``, ``--label-column``). A data set that
ships its own evaluation split (GLUE's dev set, a test file) passes it as ``heldout_file``,
read with the same reader and columns, and no split is carved. Labels stored as codes
(``0``/``1``) become names through ``label_map``; the map's order is then the label order,
so label indices match the ones the data set defines.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from fwdllm.data.formats import Dataset, LoadOptions, classification, register_format, require_columns
from fwdllm.data.textfiles import DataError, read_jsonl, read_table

Reader = Callable[[Path], list[dict]]


def parse_label_map(text: str) -> dict[str, str]:
    """``"0=negative,1=positive"`` -> ``{"0": "negative", "1": "positive"}`` (the ``--label-map`` syntax)."""
    mapping: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",") if part.strip()):
        value, sep, name = item.partition("=")
        if not sep or not value.strip() or not name.strip():
            raise DataError(f"--label-map: {item!r} is not VALUE=NAME; write e.g. --label-map 0=negative,1=positive")
        if value.strip() in mapping:
            raise DataError(f"--label-map: the value {value.strip()!r} is mapped twice")
        mapping[value.strip()] = name.strip()
    if not mapping:
        raise DataError("--label-map is empty; write e.g. --label-map 0=negative,1=positive")
    return mapping


def _examples(rows: list[dict], file: Path, options: LoadOptions) -> list[dict]:
    text_columns = (options.text_column or "text").split(",")
    label_column = options.label_column or "label"
    require_columns(file, rows, [*text_columns, label_column])
    examples = [
        {
            "text": " ".join(str(r[c]).strip() for c in text_columns if r[c] is not None and str(r[c]).strip()),
            "label": str(r[label_column]).strip(),
        }
        for r in rows
    ]
    examples = [e for e in examples if e["text"] and e["label"]]
    if options.label_map is not None:
        unmapped = sorted({e["label"] for e in examples} - options.label_map.keys(), key=_natural_key)
        if unmapped:
            raise DataError(
                f"{file}: label value(s) {unmapped[:5]} in column {label_column!r} are not in --label-map "
                f"(it maps {sorted(options.label_map)}); add them as VALUE=NAME"
            )
        examples = [{"text": e["text"], "label": options.label_map[e["label"]]} for e in examples]
    return examples


def _table(read: Reader, path: Path, options: LoadOptions) -> Dataset:
    train = _examples(read(path), path, options)
    heldout = None
    if options.heldout_file is not None:
        if not options.heldout_file.is_file():
            raise DataError(f"the held-out file {options.heldout_file} does not exist")
        heldout = _examples(read(options.heldout_file), options.heldout_file, options)
    found = {e["label"] for e in train + (heldout or [])}
    if options.label_map is not None:
        labels = list(dict.fromkeys(options.label_map.values()))
    else:
        labels = sorted(found, key=_natural_key)
    if len(labels) < 2:
        raise DataError(
            f"{path}: column {options.label_column or 'label'!r} holds {len(labels)} distinct label(s); "
            "classification needs two or more"
        )
    return classification(path, labels, train, heldout, options)


def _natural_key(label: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", label))


@register_format(
    "csv",
    needs_path=True,
    help="any CSV with a header; --text-column (default text), --label-column (default label), "
    "--heldout-file, --label-map",
)
def _csv(path: Path, options: LoadOptions) -> Dataset:
    return _table(lambda file: read_table(file, ","), path, options)


@register_format("tsv", needs_path=True, help="any TSV with a header; options as for csv")
def _tsv(path: Path, options: LoadOptions) -> Dataset:
    return _table(lambda file: read_table(file, "\t"), path, options)


@register_format("jsonl", needs_path=True, help="one JSON object per line; keys and options as for csv")
def _jsonl(path: Path, options: LoadOptions) -> Dataset:
    return _table(read_jsonl, path, options)
