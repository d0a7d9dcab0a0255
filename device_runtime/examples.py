"""A client's local data: its JSONL file read into ``Example``s and the batch a task names.

One example per line: ``{"text": str, "label": str|int}`` (seq-cls; a label name from
``manifest.model.labels`` or its index), ``{"prompt": str, "label": str|int}`` (a decoder
answering with label words; ``{"prompt", "target"}`` with the label word as target is read the
same way), or ``{"prompt": str, "target": str}`` (causal-lm, open-ended). A task names a batch
as the examples at indices ``[start, start+size)`` modulo the local count.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fwdllm.errors import UserError
from fwdllm.proto.manifest import Manifest
from fwdllm.proto.names import Task

#: Label value for "no loss here" (PyTorch's CrossEntropyLoss ignore_index).
IGNORE_INDEX = -100


class DataError(UserError):
    """Local training data that cannot be used; the message names the file, line and fix."""


@dataclass(frozen=True)
class Example:
    """One local example: seq-cls uses (text, label); label words (prompt, label); causal-lm (prompt, target)."""

    text: str = ""
    label: int = IGNORE_INDEX
    prompt: str = ""
    target: str = ""


def load_examples(path: str | Path, manifest: Manifest) -> list[Example]:
    """Read a client's JSONL file; blank lines are skipped, every other problem is a DataError."""
    from fwdllm.data.textfiles import utf8_lines

    path = Path(path)
    if not path.is_file():
        raise DataError(f"local data file {path} does not exist; create it with `fwdllm data partition`")
    task, labels = manifest.model.task, manifest.model.labels
    num_labels = manifest.model.num_labels or (len(labels) if labels else None)
    examples, problems = [], []
    for lineno, line in enumerate(utf8_lines(path, DataError), 1):  # a line that is not UTF-8 stops the read
        if not line.strip():
            continue
        try:
            examples.append(
                _parse_example(json.loads(line), task, labels, num_labels, bool(manifest.model.label_token_ids))
            )
        except (ValueError, TypeError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            problems.append(f"line {lineno}: {str(exc)[:200]}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise DataError(f"{path} has unusable examples: {'; '.join(problems[:5])}{more}")
    if not examples:
        raise DataError(f"{path} holds no examples; a client needs at least one")
    return examples


def _parse_example(obj: Any, task: str, labels: list[str] | None, num_labels: int | None, label_words: bool) -> Example:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if label_words:
        prompt = obj.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError('empty or missing "prompt"')
        label = obj["label"] if "label" in obj else obj.get("target")
        return Example(
            prompt=prompt, label=_label_index(label.strip() if isinstance(label, str) else label, labels, num_labels)
        )
    if task == Task.SEQ_CLS:
        text, label = obj.get("text"), obj.get("label")
        if not isinstance(text, str) or not text.strip():
            raise ValueError('empty or missing "text"')
        return Example(text=text, label=_label_index(label, labels, num_labels))
    prompt, target = obj.get("prompt", ""), obj.get("target")
    if not isinstance(prompt, str) or not isinstance(target, str) or not target.strip():
        raise ValueError('causal-lm examples need a string "prompt" and a non-empty string "target"')
    return Example(prompt=prompt, target=target)


def _label_index(label: Any, labels: list[str] | None, num_labels: int | None) -> int:
    if isinstance(label, bool) or label is None:
        raise ValueError(f'missing or invalid "label" {label!r}')
    if isinstance(label, str) and labels and label in labels:
        return labels.index(label)
    if isinstance(label, str) and label.strip().lstrip("-").isdigit():
        label = int(label)
    if isinstance(label, int) and num_labels is not None and 0 <= label < num_labels:
        return label
    known = f"one of {labels} or an index below {num_labels}" if labels else f"an index below {num_labels}"
    raise ValueError(f"unknown label {label!r}; the bundle's labels are {known}")


def select(examples: list[Example], start: int, size: int) -> list[Example]:
    """The examples a task's BatchRef names: indices [start, start+size) modulo the local count."""
    if size <= 0:
        raise DataError(f"a batch needs at least one example, the task asks for {size}")
    n = len(examples)
    return [examples[(start + i) % n] for i in range(size)]
