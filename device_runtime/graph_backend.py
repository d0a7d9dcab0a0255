"""What the ONNX Runtime and LiteRT backends share: graphs that take θ as an input.

A subclass only loads a graph file and runs it on named numpy inputs. This class maps the
bundle's graph contract (export/BUNDLE.md) onto that: fixed batch and perturbation axes
(TFLite) are met by splitting and padding, and when the bundle was cut at a layer the
frozen prefix runs once per batch while every θ row goes through the suffix.
"""

from __future__ import annotations

from abc import abstractmethod
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from fwdllm.device_runtime.backend import Backend, BackendError, Batch
from fwdllm.proto.manifest import GraphSpec, Manifest
from fwdllm.proto.names import GraphRole, ThetaChannel

#: Memory for cached prefix outputs per backend (option ``prefix_cache_mb``). The frozen prefix of a
#: local example never changes, so a device that keeps its examples' hidden states runs the prefix
#: once per example for the whole run (SmolLM2, 40 tokens: 92 KB an example).
PREFIX_CACHE_MB = 256


class GraphBackend(Backend):
    """Runs a bundle's ``full`` graph, or its ``prefix`` + ``suffix`` pair with prefix reuse.

    Option ``prefix_reuse`` (default True) uses the cut graphs when the bundle has them.
    """

    def __init__(self, bundle_dir: str | Path, manifest: Manifest, graph: GraphSpec, options: dict[str, Any]):
        super().__init__(bundle_dir, manifest, graph, options)
        prefix = self._sibling(GraphRole.PREFIX)
        suffix = graph if graph.role == GraphRole.SUFFIX else self._sibling(GraphRole.SUFFIX)
        self.cut = bool(prefix and suffix) and (
            graph.role == GraphRole.SUFFIX or bool(options.get("prefix_reuse", True))
        )
        if graph.role == GraphRole.SUFFIX and not self.cut:
            raise BackendError(f"the bundle has a {graph.format} suffix graph but no matching prefix; re-export it")
        self.specs: dict[str, GraphSpec] = (
            {GraphRole.PREFIX: prefix, GraphRole.SUFFIX: suffix}
            if self.cut and prefix and suffix
            else {GraphRole.FULL: graph}
        )
        self.graph = self.specs.get(GraphRole.SUFFIX, graph)
        self._handles = {role: self._load(spec, self.bundle_dir / spec.file) for role, spec in self.specs.items()}
        self._hidden: OrderedDict[bytes, np.ndarray] = OrderedDict()  # one example's tokens -> its hidden states
        self._hidden_bytes = 0
        self._hidden_limit = int(float(options.get("prefix_cache_mb", PREFIX_CACHE_MB)) * (1 << 20))
        self.prefix_runs = 0  # how often the prefix actually ran (tests and benchmarks read it)

    def _sibling(self, role: str) -> GraphSpec | None:
        found = [
            g
            for g in self.manifest.graphs
            if g.format == self.graph.format and g.role == role and g.precision == self.graph.precision
        ]
        return found[0] if found else None

    @property
    def rows_per_call(self) -> int:
        """Above a cut, large calls amortise the per-call overhead: 64 rows through a head-only
        suffix, 8 through suffix layers (their activations grow with the rows)."""
        if self.max_perturbations or "rows_per_call" in self.options or not self.cut:
            return super().rows_per_call
        return 64 if (self.manifest.cut_layer or 0) >= (self.manifest.model.num_layers or 0) else 8

    # ----- what a runtime implements -----
    @abstractmethod
    def _load(self, spec: GraphSpec, path: Path) -> Any:
        """Open one graph file; raise BackendError when it is corrupt or disagrees with ``spec``."""

    @abstractmethod
    def _run(self, handle: Any, spec: GraphSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run a graph on inputs named as in ``spec.inputs``; return outputs named as in ``spec.outputs``."""

    # ----- the Backend interface -----
    def losses(self, batch: Batch, thetas: np.ndarray) -> np.ndarray:
        thetas = self.check_thetas(thetas)
        self._check_batch(batch)
        total = np.zeros(thetas.shape[0], dtype=np.float64)
        weight = 0
        for chunk in self._chunks(batch):
            w = chunk.loss_weight()
            if w:
                total += w * self._chunk_losses(chunk, thetas)
                weight += w
        if not weight:
            raise BackendError("the batch has no labelled examples or target tokens, so it has no loss")
        return (total / weight).astype(np.float32)

    def logits(self, batch: Batch, theta: np.ndarray) -> np.ndarray:
        thetas = self.check_thetas(np.asarray(theta).reshape(1, -1))
        self._check_batch(batch)
        if not self.manifest.model.classifies:
            raise BackendError(
                "logits() is for classifying bundles (seq-cls or label words); this causal-lm "
                "graph returns only the next-token loss"
            )
        parts = [self._over_thetas(chunk, thetas, "logits")[0] for chunk in self._chunks(batch)]
        return np.concatenate(parts)[: batch.size]

    # ----- helpers -----
    def _check_batch(self, batch: Batch) -> None:
        if self.graph.seq_len and batch.seq_len != self.graph.seq_len:
            raise BackendError(
                f"this graph was exported for sequence length {self.graph.seq_len}, the batch has "
                f"{batch.seq_len}; build batches with backend.tokenizer()"
            )

    def _chunks(self, batch: Batch):
        """The batch in pieces the graph accepts: all at once, or fixed-size with padding rows."""
        step = self.batch_size or batch.size
        if step == batch.size:
            yield batch
            return
        for start in range(0, batch.size, step):
            yield batch.rows(start, min(start + step, batch.size), pad_to=self.batch_size)

    def _chunk_losses(self, chunk: Batch, thetas: np.ndarray) -> np.ndarray:
        """Mean loss of the chunk's real rows per θ row (float64)."""
        if not (chunk.padded and chunk.labels.ndim == 1):
            return self._over_thetas(chunk, thetas, "loss").astype(np.float64)
        # seq-cls graphs average over all B rows: take the real rows' cross-entropy from the logits
        logits = self._over_thetas(chunk, thetas, "logits")[:, : chunk.real_rows].astype(np.float64)
        top = logits.max(-1, keepdims=True)
        logz = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
        picked = np.take_along_axis(logits, chunk.labels[None, : chunk.real_rows, None], -1)[..., 0]
        return (logz - picked).mean(1)

    def _over_thetas(self, chunk: Batch, thetas: np.ndarray, output: str) -> np.ndarray:
        """One output for every θ row, in calls of ``rows_per_call`` rows (a fixed P's last call padded;
        a dynamic P's last call is as short as what is left)."""
        p = self.rows_per_call
        parts = []
        for start in range(0, thetas.shape[0], p):
            rows = thetas[start : start + p]
            k = rows.shape[0]
            if k < p and self.max_perturbations:
                rows = np.concatenate([rows, np.repeat(rows[-1:], p - k, axis=0)])
            parts.append(self._evaluate(chunk, rows)[output][:k])
        return np.concatenate(parts)

    def _evaluate(self, chunk: Batch, thetas: np.ndarray) -> dict[str, np.ndarray]:
        values = {
            "input_ids": chunk.input_ids,
            "attention_mask": chunk.attention_mask,
            "labels": chunk.labels,
            "theta": thetas,
        }
        if self.cut:
            values["hidden"] = self._prefix_hidden(chunk)
            return self._call(GraphRole.SUFFIX, values)
        return self._call(GraphRole.FULL, values)

    def _prefix_hidden(self, chunk: Batch) -> np.ndarray:
        """The prefix's hidden states of a chunk, assembled row by row from the per-example cache.

        A real token's hidden state does not depend on the padding after it (rows are right-padded
        and padded keys are masked), so rows are cached by their real tokens and the prefix runs only on rows not
        seen before; positions past a row's end are zeros, which the suffix masks likewise.
        """
        lengths = chunk.attention_mask.sum(1).astype(int)
        keys = [chunk.input_ids[i, :n].tobytes() for i, n in enumerate(lengths)]
        missing = [i for i, k in enumerate(keys) if k not in self._hidden]
        for key in keys:  # the chunk's rows become the most recent: eviction below spares them
            if key in self._hidden:
                self._hidden.move_to_end(key)
        if missing:
            self._run_prefix(chunk, missing, keys, lengths)
        width = self._hidden[keys[0]].shape[-1]
        out = np.zeros((chunk.size, chunk.seq_len, width), dtype=np.float32)
        for i, (key, n) in enumerate(zip(keys, lengths)):
            out[i, :n] = self._hidden[key]
        return out

    def _run_prefix(self, chunk: Batch, rows: list[int], keys: list[bytes], lengths: np.ndarray) -> None:
        sub = Batch.of(chunk.input_ids[rows], chunk.attention_mask[rows], chunk.labels[rows])
        step = self.batch_size or len(rows)
        for start in range(0, len(rows), step):
            part = sub.rows(start, min(start + step, len(rows)), pad_to=self.batch_size)
            hidden = self._call(GraphRole.PREFIX, {"input_ids": part.input_ids, "attention_mask": part.attention_mask})[
                "hidden"
            ]
            self.prefix_runs += 1
            for j, i in enumerate(rows[start : start + step]):
                value = np.array(hidden[j, : lengths[i]], dtype=np.float32)
                if keys[i] not in self._hidden:
                    self._hidden_bytes += value.nbytes
                self._hidden[keys[i]] = value
        while self._hidden_bytes > self._hidden_limit and len(self._hidden) > len(set(keys)):
            self._hidden_bytes -= self._hidden.popitem(last=False)[1].nbytes

    def _call(self, role: str, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.specs[role]
        missing = [t.name for t in spec.inputs if t.name not in values]
        if missing:
            raise BackendError(
                f"the manifest's {role} graph wants inputs {missing} that fwdllm does not know; "
                "the manifest does not match this fwdllm's graph contract, re-export the bundle"
            )
        return self._run(self._handles[role], spec, {t.name: values[t.name] for t in spec.inputs})

    def clear_cache(self) -> None:
        """Forget cached prefix outputs (benchmarks measure the uncached cost)."""
        self._hidden.clear()
        self._hidden_bytes = 0

    def graph_info(self) -> dict[str, Any]:
        return {
            "graphs": {role: spec.file for role, spec in self.specs.items()},
            "precision": self.graph.precision,
            "prefix_reuse": self.cut,
            "cut_layer": self.manifest.cut_layer if self.cut else None,
            "max_perturbations": self.max_perturbations,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
        }


def check_io(spec: GraphSpec, inputs: list[str], outputs: list[str], path: Path, by_name: bool) -> None:
    """The graph file's own inputs/outputs must be the manifest's: by name (ONNX) or by count (TFLite)."""
    for kind, have, want in (
        ("inputs", inputs, [t.name for t in spec.inputs]),
        ("outputs", outputs, [t.name for t in spec.outputs]),
    ):
        if (sorted(have) != sorted(want)) if by_name else (len(have) != len(want)):
            raise BackendError(
                f"{path.name} has {kind} {have} but the manifest says {want}: "
                "the manifest does not match the graph; re-export the bundle"
            )


def check_theta_dim(spec: GraphSpec, shape: list[Any], dim: int, path: Path) -> None:
    """A graph whose θ input has another length than the manifest's layout cannot be fed."""
    last = shape[-1] if shape else None
    if (
        spec.theta_channel == ThetaChannel.INPUT
        and isinstance(last, (int, np.integer))
        and last > 0
        and int(last) != dim
    ):
        raise BackendError(
            f"{path.name} takes θ of length {last}, the manifest's layout has {dim}: "
            "the manifest does not match the graph; re-export the bundle"
        )
