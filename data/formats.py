"""What every data set loader shares: the ``Dataset`` it returns, the options it reads, the
registry it joins, and the seeded held-out split.

Loaders live in ``corpora.py`` (named data sets) and ``tables.py`` (any CSV/TSV/JSONL);
``datasets.py`` is the front door that finds them by name.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fwdllm.data.textfiles import DataError
from fwdllm.proto.names import Task

DEFAULT_HELDOUT_FRACTION = 0.2
DEFAULT_SPLIT_SEED = 0


@dataclass
class Dataset:
    """A loaded data set: its examples split into train and held-out, and its label names."""

    spec: str
    task: str  # seq-cls | causal-lm
    labels: list[str]  # label names, in label-index order; empty for causal-lm
    train: list[dict]
    heldout: list[dict]
    source: str = ""  # the file or folder it was read from

    def label_ids(self, examples: list[dict]) -> np.ndarray:
        return label_ids(self.labels, examples)

    def histogram(self, examples: list[dict]) -> dict[str, int]:
        counts = Counter(e["label"] for e in examples)
        return {name: counts.get(name, 0) for name in self.labels}


def label_ids(labels: list[str], examples: list[dict]) -> np.ndarray:
    """Label indices (int64) of examples whose ``label`` is a name from ``labels``."""
    lookup = {name: i for i, name in enumerate(labels)}
    return np.array([lookup[e["label"]] for e in examples], dtype=np.int64)


@dataclass
class LoadOptions:
    """Options every loader may use; the generic table formats need the column names."""

    text_column: str | None = None  # comma-separated names are joined with a space
    label_column: str | None = None
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION
    seed: int = DEFAULT_SPLIT_SEED
    heldout_file: Path | None = None  # csv/tsv/jsonl: the held-out examples (e.g. a dev split); nothing is carved
    label_map: dict[str, str] | None = None  # csv/tsv/jsonl: a label value as stored -> the label's name


@dataclass
class _Format:
    name: str
    load: Callable[[Path | None, LoadOptions], Dataset]
    needs_path: bool
    help: str


FORMATS: dict[str, _Format] = {}


def register_format(name: str, *, needs_path: bool, help: str):
    """Decorator: ``fn(path, options) -> Dataset`` loads the format ``name`` (``NAME`` or ``NAME:PATH``)."""

    def deco(fn):
        FORMATS[name] = _Format(name, fn, needs_path, help)
        return fn

    return deco


# ----- splitting ---------------------------------------------------------------------------


def seeded_split(
    examples: list[dict], fraction: float, seed: int, key: str | None = "label"
) -> tuple[list[dict], list[dict]]:
    """A fixed train/held-out split: each value of ``key`` (each label) keeps its share.

    Stratifying keeps a small held-out set's label mix equal to the data's, so accuracy on
    it is comparable between runs and data sets.
    """
    rng = np.random.default_rng(seed)
    groups: dict[object, list[int]] = {}
    for i, e in enumerate(examples):
        groups.setdefault(e.get(key) if key else None, []).append(i)
    heldout_idx: list[int] = []
    for group_key in sorted(groups, key=str):
        idx = np.array(groups[group_key])
        rng.shuffle(idx)
        heldout_idx.extend(idx[: int(round(len(idx) * fraction))].tolist())
    held = set(heldout_idx)
    train = [examples[i] for i in rng.permutation(len(examples)) if i not in held]
    heldout = [examples[i] for i in rng.permutation(heldout_idx)]  # shuffled: any prefix is a fair sample
    return train, heldout


def classification(
    path: Path | None, labels: list[str], train: list[dict], heldout: list[dict] | None, options: LoadOptions
) -> Dataset:
    if heldout is None:
        train, heldout = seeded_split(train, options.heldout_fraction, options.seed)
    return Dataset(spec="", task=Task.SEQ_CLS, labels=labels, train=train, heldout=heldout, source=str(path or ""))


def require_columns(file: Path, rows: list[dict], columns: list[str]) -> None:
    have = list(rows[0].keys()) if rows else []
    missing = [c for c in columns if c not in have]
    if missing:
        raise DataError(
            f"{file} has no column(s) {missing}; its header row is {have[:6]}. "
            "Name the columns with --text-column/--label-column (the first row must be a header)"
        )
