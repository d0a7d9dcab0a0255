"""The one narrow interface every device backend implements, its batches, and the backend registry.

Everything above a backend (the forward-gradient engine, the client, the benchmarks) sees
only ``Backend.losses(batch, thetas)``: P parameter vectors evaluated on one batch. How θ
enters the model (a graph input with a perturbation axis, a LoRA adapter file, a control
vector) and whether a frozen prefix is reused are the backend's business.
Local data (``Example``, one JSONL file per client) is ``examples.py``.
"""

from __future__ import annotations

import hashlib
import importlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from fwdllm.device_runtime.examples import IGNORE_INDEX, DataError, Example
from fwdllm.errors import UserError
from fwdllm.proto.manifest import BundleError, GraphSpec, Manifest, load_manifest
from fwdllm.proto.names import GraphFormat, GraphRole, Task


class BackendError(UserError):
    """A backend that cannot run this bundle or input; the message says what to change."""


# ---------------------------------------------------------------- batches


@dataclass(frozen=True)
class Batch:
    """Token ids ready for a graph: ``input_ids``/``attention_mask`` int64 [B, S].

    ``labels`` is int64 [B] (seq-cls) or [B, S] (causal-lm, aligned with ``input_ids`` as in
    Hugging Face: the graph shifts them; ``IGNORE_INDEX`` where no loss is taken).
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray
    key: str = field(default="", compare=False)  # content hash, the prefix cache key
    real_rows: int | None = field(default=None, compare=False)  # rows before padding; None: all are real

    @classmethod
    def of(
        cls, input_ids: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray, real_rows: int | None = None
    ) -> Batch:
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        lab = np.ascontiguousarray(labels, dtype=np.int64)
        if ids.ndim != 2 or ids.shape != mask.shape or lab.shape[0] != ids.shape[0]:
            raise BackendError(f"inconsistent batch shapes: ids {ids.shape}, mask {mask.shape}, labels {lab.shape}")
        digest = hashlib.sha256(ids.tobytes() + mask.tobytes() + str(ids.shape).encode()).hexdigest()
        return cls(ids, mask, lab, digest, real_rows)

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def padded(self) -> bool:
        return self.real_rows is not None and self.real_rows < self.size

    def loss_weight(self) -> int:
        """How many terms the mean loss averages over: real rows (seq-cls) or shifted labelled tokens."""
        if self.labels.ndim == 1:
            return self.size if self.real_rows is None else self.real_rows
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    def rows(self, start: int, stop: int, pad_to: int | None = None) -> Batch:
        """Rows [start, stop), padded to ``pad_to`` rows with copies of the first row.

        Padding rows carry no loss: causal-lm labels are IGNORE_INDEX; seq-cls labels are a
        valid class (graphs average over every row), and backends take the loss of a padded
        seq-cls batch from the logits of its real rows.
        """
        ids, mask, lab = self.input_ids[start:stop], self.attention_mask[start:stop], self.labels[start:stop]
        real = ids.shape[0]
        missing = (pad_to or 0) - real
        if missing > 0:
            ids = np.concatenate([ids, np.repeat(ids[:1], missing, 0)])
            mask = np.concatenate([mask, np.repeat(mask[:1], missing, 0)])
            fill = (
                np.full((missing, *lab.shape[1:]), IGNORE_INDEX, dtype=np.int64)
                if lab.ndim > 1
                else np.repeat(lab[:1], missing)
            )
            lab = np.concatenate([lab, fill])
        return Batch.of(ids, mask, lab, real if missing > 0 else None)


class Tokenizer:
    """The bundle's ``tokenizers`` JSON tokenizer, truncating to ``seq_len`` and padding to it, or with
    ``pad_to_longest`` (graphs whose sequence axis is dynamic) only to the batch's longest row: short
    prompts then cost what their tokens cost."""

    def __init__(
        self, bundle_dir: str | Path, manifest: Manifest, seq_len: int | None = None, pad_to_longest: bool = False
    ):
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(bundle_dir) / manifest.model.tokenizer
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on a bad file
            raise BundleError(f"cannot read the bundle tokenizer {path} ({exc}); copy the bundle again") from exc
        self._tok.no_padding()
        self._tok.no_truncation()
        self.task = manifest.model.task
        self.label_words = bool(manifest.model.label_token_ids)
        self.seq_len = int(seq_len or manifest.model.max_seq_len)
        self.pad_id = int(manifest.model.pad_token_id or 0)
        self.pad_to_longest = pad_to_longest

    def batch(self, examples: list[Example]) -> Batch:
        if not examples:
            raise DataError("cannot build a batch from no examples")
        s, n = self.seq_len, len(examples)
        ids = np.full((n, s), self.pad_id, dtype=np.int64)
        mask = np.zeros((n, s), dtype=np.int64)
        if self.task == Task.SEQ_CLS:
            labels = np.array([e.label for e in examples], dtype=np.int64)
            for i, enc in enumerate(self._tok.encode_batch([e.text for e in examples])):
                row = _truncate(
                    enc.ids,
                    s,
                    keep_last=bool(enc.ids) and len(enc.special_tokens_mask) > 0 and enc.special_tokens_mask[-1] == 1,
                )
                ids[i, : len(row)], mask[i, : len(row)] = row, 1
            return self._batch(ids, mask, labels)
        if self.label_words:  # the answer is scored after the prompt's last token: keep the end, cut the start
            for i, e in enumerate(examples):
                row = self._tok.encode(e.prompt).ids[-s:]
                ids[i, : len(row)], mask[i, : len(row)] = row, 1
            return self._batch(ids, mask, np.array([e.label for e in examples], dtype=np.int64))
        labels = np.full((n, s), IGNORE_INDEX, dtype=np.int64)
        for i, e in enumerate(examples):
            prompt = self._tok.encode(e.prompt).ids if e.prompt else []
            target = self._tok.encode(e.target, add_special_tokens=False).ids
            row = (prompt + target)[:s]
            ids[i, : len(row)], mask[i, : len(row)] = row, 1
            labels[i, len(prompt) : len(row)] = row[len(prompt) :]
        return self._batch(ids, mask, labels)

    def _batch(self, ids: np.ndarray, mask: np.ndarray, labels: np.ndarray) -> Batch:
        if self.pad_to_longest:
            width = max(1, int(mask.sum(1).max()))
            ids, mask = ids[:, :width], mask[:, :width]
            labels = labels[:, :width] if labels.ndim == 2 else labels
        return Batch.of(ids, mask, labels)


def _truncate(ids: list[int], length: int, keep_last: bool) -> list[int]:
    """Cut to ``length`` tokens, keeping a closing special token such as [SEP]."""
    if len(ids) <= length:
        return ids
    return ids[: length - 1] + ids[-1:] if keep_last else ids[:length]


# ---------------------------------------------------------------- the backend interface


class Backend(ABC):
    """Evaluates a bundle's loss for P trainable vectors θ on one batch.

    A backend is made with ``(bundle_dir, manifest, graph, options)``; ``graph`` is the manifest
    entry it runs (its ``full`` or ``base`` graph), and ``options`` are backend-specific knobs.
    What the code above asks of a backend before opening one (its name, the graphs it loads,
    what it can do, its options and delegates) it declares in the class attributes and class
    methods below; a subclass that sets ``name`` registers itself in ``BACKENDS`` by being defined.
    """

    #: What users call it: ``--backend``, ``[eval] backend``.
    name: ClassVar[str] = ""
    #: The graph format it loads, and the role of the graph θ enters (a cut bundle's suffix stands in for full).
    graph_format: ClassVar[GraphFormat]
    theta_role: ClassVar[GraphRole] = GraphRole.FULL
    #: Whether ``logits`` of an open-ended causal-lm bundle are next-token logits over the vocabulary, which
    #: restricted-choice evaluation needs (the ONNX/TFLite causal-lm graphs return only the loss).
    next_token_logits: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            _REGISTERED[cls.name] = cls

    @classmethod
    @abstractmethod
    def runtime_info(cls) -> dict[str, Any]:
        """The installed runtime: its version and what it can use on this machine; ImportError when missing."""

    @classmethod
    def cli_options(cls, args: Any) -> dict[str, Any]:
        """This backend's options from the parsed ``fwdllm device`` arguments (device_runtime/cli.py)."""
        return {}

    @classmethod
    def delegate_options(cls, threads: int, libraries: list[str]) -> list[tuple[str, dict[str, Any]]]:
        """(delegate or provider name, options) for each way this backend can run here, with external
        delegate ``libraries`` (paths of .so files) where it takes them."""
        return [("cpu", {"threads": threads})]

    def __init__(self, bundle_dir: str | Path, manifest: Manifest, graph: GraphSpec, options: dict[str, Any]):
        self.bundle_dir = Path(bundle_dir)
        self.manifest = manifest
        self.graph = graph
        self.options = dict(options)
        self._tokenizer: Tokenizer | None = None

    @property
    def max_perturbations(self) -> int | None:
        """Rows of θ one call evaluates, fixed by the graph; None when any number fits."""
        return self.graph.perturbations

    @property
    def rows_per_call(self) -> int:
        """θ rows per runtime call: the graph's fixed P, else option ``rows_per_call``, else 1.

        Where every row reruns the whole model, one row per call is fastest on a CPU (MiniLM
        LoRA 8×64, 1 thread: an 8-row call took 1.2–1.7× the time of eight 1-row calls, a
        2-row call 1.05× two 1-row calls) and holds activations to those of plain inference.
        """
        if self.max_perturbations:
            return self.max_perturbations
        return max(1, int(self.options.get("rows_per_call", 1)))

    @property
    def batch_size(self) -> int | None:
        """The graph's fixed batch size, or None when it is dynamic."""
        return self.graph.batch_size

    @property
    def seq_len(self) -> int:
        return int(self.graph.seq_len or self.manifest.model.max_seq_len)

    @property
    def theta_dim(self) -> int:
        return self.manifest.theta.dim

    def tokenizer(self) -> Tokenizer:
        """The bundle's tokenizer, read once (it never changes): the many virtual clients of a simulation
        worker share one backend and so one tokenizer."""
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(
                self.bundle_dir, self.manifest, self.seq_len, pad_to_longest=not self.graph.seq_len
            )
        return self._tokenizer

    def check_thetas(self, thetas: np.ndarray) -> np.ndarray:
        """θ rows as contiguous float32 [P, d], or a BackendError naming what is wrong."""
        thetas = np.asarray(thetas)
        if thetas.ndim != 2 or thetas.shape[1] != self.theta_dim:
            raise BackendError(f"θ must have shape [P, {self.theta_dim}] for this bundle, got {list(thetas.shape)}")
        if thetas.shape[0] == 0:
            raise BackendError("θ has no rows; pass at least one parameter vector")
        return np.ascontiguousarray(thetas, dtype=np.float32)

    @abstractmethod
    def losses(self, batch: Batch, thetas: np.ndarray) -> np.ndarray:
        """float32 [P]: the batch's mean loss at each row of ``thetas`` (float32 [P, d]).

        Any P is accepted; a backend with a fixed perturbation axis splits or pads the rows.
        Non-finite losses are returned as they are.
        """

    @abstractmethod
    def logits(self, batch: Batch, theta: np.ndarray) -> np.ndarray:
        """float32 [B, C] logits at one θ (seq-cls evaluation)."""

    @abstractmethod
    def info(self) -> dict[str, Any]:
        """What is actually in use: providers/delegates, threads, share of ops delegated, graphs."""

    def close(self) -> None:  # noqa: B027 (an optional hook, not abstract)
        """Release runtime resources; the default has nothing to release."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_REGISTERED: dict[str, type[Backend]] = {}

#: Modules of the built-in backends. They import their runtimes only when a backend is opened,
#: so importing them all to list the backends needs numpy alone.
BUILT_IN = (
    "fwdllm.device_runtime.onnx_backend",
    "fwdllm.device_runtime.litert_backend",
    "fwdllm.device_runtime.llama_backend",
)

#: The backend used where none is named.
DEFAULT_BACKEND = "onnxruntime"


class UnknownBackendError(BackendError, KeyError):
    """A name no backend registered; a KeyError as well, so ``in`` and ``get`` on the registry work as on a dict."""

    __str__ = Exception.__str__  # the message as written, not KeyError's quoted repr


class _Registry(Mapping[str, type[Backend]]):
    """Backend name -> class, in registration order; the built-in modules are imported on first use."""

    def _classes(self) -> dict[str, type[Backend]]:
        for module in BUILT_IN:
            importlib.import_module(module)
        return _REGISTERED

    def __getitem__(self, name: str) -> type[Backend]:
        classes = self._classes()
        if name not in classes:
            raise UnknownBackendError(f"unknown backend {name!r}; choose one of {list(classes)}")
        return classes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._classes())

    def __len__(self) -> int:
        return len(self._classes())


#: Every backend, by name.
BACKENDS: Mapping[str, type[Backend]] = _Registry()


def select_graph(manifest: Manifest, name: str, precision: str | None = None) -> GraphSpec:
    """The manifest entry a backend runs: its full/base graph, else the suffix of a cut export."""
    cls = BACKENDS[name]
    try:
        return manifest.graph(cls.graph_format, cls.theta_role, precision)
    except BundleError:
        suffix = any(g.format == cls.graph_format and g.role == GraphRole.SUFFIX for g in manifest.graphs)
        if cls.theta_role == GraphRole.FULL and suffix:
            return manifest.graph(cls.graph_format, GraphRole.SUFFIX, precision)
        raise


def open_backend(
    bundle_dir: str | Path,
    name: str,
    precision: str | None = None,
    options: dict[str, Any] | None = None,
    manifest: Manifest | None = None,
) -> Backend:
    """Load a bundle (checking checksums unless a manifest is given) and open one backend on it."""
    manifest = manifest or load_manifest(Path(bundle_dir))
    graph = select_graph(manifest, name, precision)
    try:
        return BACKENDS[name](bundle_dir, manifest, graph, options or {})
    except ImportError as exc:
        raise BackendError(
            f"backend {name} is not installed here ({exc}); install `fwdllm[device]` (or `fwdllm[device,llama]`)"
        ) from exc
