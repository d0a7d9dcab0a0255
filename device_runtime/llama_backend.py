"""The llama.cpp backend: a GGUF base model, θ + εv applied as a LoRA adapter, loss from the logits.

Per θ row the backend rewrites one adapter GGUF (``fwdllm.proto.gguf_lora``), loads it with
``llama_adapter_lora_init`` and makes it the context's only adapter; the base weights
(q4_0, q8_0 or f16) are loaded once. Each sequence is one ``llama_decode`` that asks for
logits only at the positions that predict a labelled token, so the backend never holds
the full [S, vocab] logits of a sequence it does not need. Costs are measured by
``bench/llama_channels.py``; the choice of channel is explained in export/BUNDLE.md.
A label-word bundle cut at a layer runs its frozen layers once per example and every θ
row through a suffix GGUF (``llama_suffix.py``, measured by ``bench/llama_prefix.py``).
"""

from __future__ import annotations

import ctypes
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fwdllm.device_runtime.backend import Backend, BackendError, Batch
from fwdllm.device_runtime.examples import IGNORE_INDEX
from fwdllm.device_runtime.llama_ctypes import LoraSlot, decode, import_llama, new_context
from fwdllm.proto.manifest import BundleError, GraphSpec, Manifest
from fwdllm.proto.names import GraphFormat, GraphRole, ThetaChannel

if TYPE_CHECKING:
    from fwdllm.device_runtime.llama_suffix import CutModel


def _cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy of rows of logits [n, C] against label indices [n], in float64."""
    logits = np.asarray(logits, dtype=np.float64)
    top = logits.max(axis=1, keepdims=True)
    logz = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
    return float((logz - logits[np.arange(len(labels)), labels]).mean())


def kept_tokens(batch: Batch, i: int, n_ctx: int, n_vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Row ``i``'s real tokens (int32) and their labels, checked against the context and the vocabulary."""
    keep = batch.attention_mask[i].astype(bool)
    tokens = batch.input_ids[i][keep].astype(np.int32)
    if tokens.size == 0:
        raise BackendError(f"row {i} of the batch has no tokens (its attention mask is all 0)")
    if tokens.size > n_ctx:
        raise BackendError(f"a sequence has {tokens.size} tokens, more than this context's {n_ctx}; truncate the data")
    if tokens.max() >= n_vocab or tokens.min() < 0:
        raise BackendError(f"a token id is outside the model's vocabulary of {n_vocab}; is the tokenizer the bundle's?")
    return tokens, batch.labels[i][keep] if batch.labels.ndim == 2 else batch.labels[i]


def labelled_sequences(batch: Batch, n_ctx: int, n_vocab: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per sequence of a causal-LM batch: its tokens, the positions whose logits predict a label, and those labels."""
    if batch.labels.ndim != 2:
        raise BackendError(
            "the llama.cpp backend runs causal-LM batches (labels [B, S]); this batch is for classification"
        )
    out = []
    for i in range(batch.size):
        tokens, labels = kept_tokens(batch, i, n_ctx, n_vocab)
        where = np.flatnonzero(labels[1:] != IGNORE_INDEX)  # logits at t predict token t+1
        if where.size:
            targets = labels[where + 1].astype(np.int64)
            if targets.max() >= n_vocab or targets.min() < 0:
                raise BackendError(f"a label is outside the model's vocabulary of {n_vocab} tokens")
            out.append((tokens, where, targets))
    if not out:
        raise BackendError("the batch has no labelled tokens (every label is -100); nothing to compute a loss on")
    return out


class LlamaBackend(Backend):
    """Mean token cross-entropy of a causal-LM batch under P parameter vectors θ, on llama.cpp.

    Labels follow the Hugging Face convention (unshifted, −100 where no loss). Tokens whose
    mask is 0 are dropped and positions count from the first kept token, as in right-padded
    PyTorch. A label-word bundle's loss is the cross-entropy over its label words' logits after
    each prompt. Options: ``threads`` (default 1), ``mmap`` (default True), ``prefix_reuse``
    (default True: a bundle with a suffix GGUF runs its frozen layers once per example),
    ``prefix_cache_mb`` (memory for those hidden states, as for the ONNX/TFLite backends).
    """

    name = "llama.cpp"
    graph_format = GraphFormat.GGUF
    theta_role = GraphRole.BASE
    next_token_logits = True

    @classmethod
    def runtime_info(cls) -> dict[str, Any]:
        import llama_cpp

        return {"version": llama_cpp.__version__, "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload())}

    def __init__(
        self, bundle_dir: str | Path, manifest: Manifest, graph: GraphSpec, options: dict[str, Any] | None = None
    ):
        from fwdllm.proto.gguf_lora import LoraAdapterWriter, lora_alpha

        super().__init__(bundle_dir, manifest, graph, options or {})
        if graph.format != GraphFormat.GGUF or graph.theta_channel != ThetaChannel.LORA_ADAPTER:
            raise BackendError(
                f"the llama.cpp backend runs GGUF graphs with a lora-adapter θ channel, not "
                f"{graph.format}/{graph.theta_channel}; re-export with `--format gguf --peft lora`"
            )
        self.L = L = import_llama()
        self.threads = int(self.options.get("threads", 1))
        self.n_ctx = self.seq_len
        # llama.cpp's model, context and batch are ctypes values (llama_cpp is not analysed)
        self.model: Any = None
        self.ctx: Any = None
        self._lbatch: Any = None
        self._slot: LoraSlot | None = None
        self._tmp: Path | None = None
        self.cut: CutModel | None = None
        L.llama_backend_init()
        self.model = self.load_model(graph)
        self._tmp = Path(tempfile.mkdtemp(prefix="fwdllm-lora-"))
        try:
            self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
            ids = manifest.model.label_token_ids
            self.label_ids = np.array(ids, dtype=np.int64) if ids else None
            arch = ctypes.create_string_buffer(64)  # the adapter must name the base model's architecture
            L.llama_model_meta_val_str(self.model, b"general.architecture", arch, len(arch))
            writer_args = (
                manifest.theta,
                lora_alpha(manifest.peft.config),
                L.llama_model_n_head(self.model),
                L.llama_model_n_head_kv(self.model),
                arch.value.decode(),
            )
            suffix = self._suffix_spec()
            # θ acts in the suffix: its adapter names count blocks from the cut (a suffix implies a cut layer)
            if suffix is not None and manifest.cut_layer is not None:
                from fwdllm.device_runtime.llama_suffix import CutModel

                self.cut = CutModel(self, suffix)
                self._slot = self.cut.slot
                self.adapter_writer = LoraAdapterWriter(*writer_args, first_layer=manifest.cut_layer)
            else:
                self.ctx = new_context(L, self.model, self.n_ctx, self.threads)
                self._slot = LoraSlot(L, self.model, self.ctx)
                self.adapter_writer = LoraAdapterWriter(*writer_args)
                self._lbatch = L.llama_batch_init(self.n_ctx, 0, 1)
        except BaseException:
            self.close()
            raise

    def load_model(self, spec: GraphSpec):
        """A GGUF of the bundle as a llama.cpp model (memory-mapped unless option ``mmap`` is false)."""
        L, path = self.L, self.bundle_dir / spec.file
        if not path.is_file():
            raise BundleError(f"GGUF {path} is missing; copy the whole bundle folder again")
        mparams = L.llama_model_default_params()
        mparams.load_mode = L.LLAMA_LOAD_MODE_MMAP if self.options.get("mmap", True) else L.LLAMA_LOAD_MODE_NONE
        model = L.llama_model_load_from_file(str(path).encode(), mparams)
        if not model:
            raise BundleError(
                f"llama.cpp could not load {path}: the file is corrupt or not a GGUF model; copy it again"
            )
        return model

    def _suffix_spec(self) -> GraphSpec | None:
        """The suffix GGUF at this precision when prefix reuse applies: a label-word bundle cut at a layer."""
        if not self.options.get("prefix_reuse", True) or self.label_ids is None or not self.manifest.cut_layer:
            return None
        found = [
            g
            for g in self.manifest.graphs
            if g.format == GraphFormat.GGUF and g.role == GraphRole.SUFFIX and g.precision == self.graph.precision
        ]
        return found[0] if found else None

    def info(self) -> dict[str, Any]:
        import llama_cpp

        return {
            "backend": self.name,
            "version": llama_cpp.__version__,
            "threads": self.threads,
            "precision": self.graph.precision,
            "theta_channel": self.graph.theta_channel,
            "delegated_share": None,  # llama.cpp runs every op on its own CPU kernels here
            "prefix_reuse": self.cut is not None,
            "cut_layer": self.manifest.cut_layer if self.cut else None,
            "graphs": {"base": self.graph.file, **({"suffix": self.cut.spec.file} if self.cut else {})},
            "system": self.L.llama_print_system_info().decode(),
        }

    # ----- θ -----
    def set_theta(self, theta: np.ndarray) -> None:
        """Make θ the only LoRA adapter of the context that θ acts in (the suffix's under prefix reuse)."""
        self.manifest.theta.check(theta)
        if self._slot is None or self._tmp is None:
            raise BackendError("the llama.cpp backend is closed")
        self._slot.load(self.adapter_writer.write(self._tmp / "theta.gguf", theta))

    # ----- loss -----
    def losses(self, batch: Batch, thetas: np.ndarray) -> np.ndarray:
        """Mean token cross-entropy over the labelled tokens of ``batch``, one per row of ``thetas``."""
        thetas = self.check_thetas(thetas)
        if self.label_ids is not None:
            prompts, labels = self.prompts(batch), batch.labels[: batch.real_rows or batch.size]
            out = np.empty(len(thetas), dtype=np.float32)
            for p, theta in enumerate(thetas):
                self.set_theta(theta)
                out[p] = _cross_entropy(self.answer_logits(prompts), labels)
            return out
        sequences = labelled_sequences(batch, self.n_ctx, self.n_vocab)
        out = np.empty(len(thetas), dtype=np.float32)
        for p, theta in enumerate(thetas):
            self.set_theta(theta)
            out[p] = self.mean_nll(sequences)
        return out

    def mean_nll(self, sequences: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> float:
        """Mean token NLL of ``sequences()`` under the adapters the context holds now (one decode each)."""
        total, count = 0.0, 0
        for tokens, where, targets in sequences:
            nll = self.token_nll(tokens, where, targets)
            total += float(nll.sum())
            count += nll.size
        return total / count

    def logits(self, batch: Batch, theta: np.ndarray) -> np.ndarray:
        """float32 at one θ, after each row's last real token: the label words' logits [B, C] for a
        label-word bundle, else next-token logits over the vocabulary [B, vocab]."""
        self.set_theta(self.check_thetas(np.atleast_2d(theta))[0])
        rows = [kept_tokens(batch, i, self.n_ctx, self.n_vocab)[0] for i in range(batch.size)]
        if self.label_ids is not None:
            return self.answer_logits(rows).astype(np.float32)
        return (
            np.stack([self.token_logits(t, np.array([t.size - 1])) for t in rows])
            .reshape(batch.size, -1)
            .astype(np.float32)
        )

    def prompts(self, batch: Batch) -> list[np.ndarray]:
        """The real rows' prompt tokens of a label-word batch (labels [B])."""
        if batch.labels.ndim != 1:
            raise BackendError(
                "this bundle answers with label words; its batches carry one label per row, not token labels"
            )
        return [kept_tokens(batch, i, self.n_ctx, self.n_vocab)[0] for i in range(batch.real_rows or batch.size)]

    def answer_logits(self, prompts: list[np.ndarray]) -> np.ndarray:
        """The label words' logits [n, C] after each prompt, under the adapter set now."""
        if self.cut is not None:
            return np.stack([self.cut.label_logits(t) for t in prompts])
        return np.stack([self.token_logits(t, np.array([t.size - 1]))[0, self.label_ids] for t in prompts])

    def token_nll(self, tokens: np.ndarray, where: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """−log p(targets[i] | tokens[: where[i] + 1]) under the current θ, one llama_decode."""
        logits = self.token_logits(tokens, where)
        shifted = logits - logits.max(axis=1, keepdims=True)
        logz = np.log(np.exp(shifted).sum(axis=1))
        return logz - shifted[np.arange(len(where)), targets]

    def token_logits(self, tokens: np.ndarray, where: np.ndarray) -> np.ndarray:
        """Logits [len(where), vocab] at the positions ``where`` of one sequence, as float64."""
        if self.cut is not None:
            raise BackendError(
                "under prefix reuse θ acts in the suffix GGUF, which scores only the label words; "
                "open the backend with prefix_reuse=False for logits over the vocabulary"
            )
        L, b = self.L, self._lbatch
        n = int(tokens.size)
        want = np.zeros(n, dtype=np.int8)
        want[where] = 1
        for i in range(n):
            b.token[i] = int(tokens[i])
        decode(L, self.ctx, b, n, want)
        ptr = L.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(len(where), self.n_vocab)).astype(np.float64)

    def clear_cache(self) -> None:
        """Forget cached prefix hidden states (benchmarks measure the uncached cost)."""
        if self.cut is not None:
            self.cut.cache.clear()

    @property
    def prefix_runs(self) -> int:
        """How often the prefix actually ran (tests and benchmarks read it)."""
        return self.cut.prefix_runs if self.cut is not None else 0

    def close(self) -> None:
        L = self.L
        if self._slot is not None:
            self._slot.close()
            self._slot = None
        if self.cut is not None:
            self.cut.close()
            self.cut = None
        if self._lbatch is not None:
            L.llama_batch_free(self._lbatch)
            self._lbatch = None
        if self.ctx:
            L.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            L.llama_model_free(self.model)
            self.model = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __del__(self) -> None:
        if getattr(self, "L", None) is not None:
            self.close()
