"""The llama.cpp backend: a GGUF base model, θ + εv applied as a LoRA adapter, loss from the logits.

Per θ row the backend rewrites one adapter GGUF (``fwdllm.export.gguf_lora``), loads it with
``llama_adapter_lora_init`` and makes it the context's only adapter; the base weights
(q4_0, q8_0 or f16) are loaded once. Each sequence is one ``llama_decode`` that asks for
logits only at the positions that predict a labelled token, so the backend never holds
the full [S, vocab] logits of a sequence it does not need. Costs are measured by
``bench/llama_channels.py``; the choice of channel is explained in export/BUNDLE.md.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fwdllm.errors import UserError
from fwdllm.proto.manifest import BundleError, GraphSpec, Manifest

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


def import_llama():
    """llama_cpp's low-level API, its logging routed through Python's; a clear error when it is missing."""
    try:
        import llama_cpp
        from llama_cpp import llama_cpp as L
    except ImportError as exc:
        raise UserError(
            "the llama.cpp backend needs llama-cpp-python: "
            "CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" pip install 'fwdllm[device,llama]'"
        ) from exc
    del llama_cpp
    L.llama_log_set(_log_callback(), ctypes.c_void_p(0))
    return L


@functools.cache
def _log_callback():
    """Route llama.cpp's log lines to Python logging: it logs every tensor it loads, and one
    warning per LoRA tensor on every adapter load (hundreds per perturbation)."""
    from llama_cpp import llama_cpp as L

    # Its warnings become INFO: the per-tensor LoRA ones ("cannot use buft CPU_REPACK") are expected.
    levels = {2: logging.INFO, 3: logging.ERROR}
    llama_log = logging.getLogger("llama.cpp")

    def forward(level: int, text: bytes, _user) -> None:
        py_level = levels.get(level, logging.DEBUG)
        if llama_log.isEnabledFor(py_level):
            llama_log.log(py_level, text.decode("utf-8", "replace").rstrip())

    return L.llama_log_callback(forward)


class LlamaCppBackend:
    """Mean token cross-entropy of a causal-LM batch under P parameter vectors θ, on llama.cpp.

    ``batch`` holds ``input_ids``, ``attention_mask`` and ``labels`` ([B, S]; labels in the
    Hugging Face convention: unshifted, −100 where no loss). Tokens whose mask is 0 are
    dropped and positions count from the first kept token, as in right-padded PyTorch.
    Options: ``threads`` (default 1), ``n_ctx`` (default the manifest's max_seq_len),
    ``mmap`` (default True).
    """

    name = "llama.cpp"
    max_perturbations = None  # any P: rows are evaluated one after another

    def __init__(self, bundle_dir: Path, manifest: Manifest, graph: GraphSpec, options: Mapping[str, Any] | None = None):
        from fwdllm.export.gguf_lora import LoraAdapterWriter, lora_alpha

        if graph.format != "gguf" or graph.theta_channel != "lora-adapter":
            raise BundleError(
                f"the llama.cpp backend runs GGUF graphs with a lora-adapter θ channel, not "
                f"{graph.format}/{graph.theta_channel}; re-export with `--format gguf --peft lora`"
            )
        options = dict(options or {})
        self.L = L = import_llama()
        self.layout = manifest.theta
        self.threads = int(options.get("threads", 1))
        self.n_ctx = int(options.get("n_ctx", manifest.model.max_seq_len))
        path = Path(bundle_dir) / graph.file
        if not path.is_file():
            raise BundleError(f"GGUF {path} is missing; copy the whole bundle folder again")

        L.llama_backend_init()
        mparams = L.llama_model_default_params()
        mparams.load_mode = L.LLAMA_LOAD_MODE_MMAP if options.get("mmap", True) else L.LLAMA_LOAD_MODE_NONE
        self.model = L.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise BundleError(f"llama.cpp could not load {path}: the file is corrupt or not a GGUF model")
        self.ctx = None
        self._adapter = None
        self._tmp = Path(tempfile.mkdtemp(prefix="fwdllm-lora-"))
        try:
            cparams = L.llama_context_default_params()
            cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = self.n_ctx
            cparams.n_seq_max = 1
            cparams.n_threads = cparams.n_threads_batch = self.threads
            self.ctx = L.llama_init_from_model(self.model, cparams)
            if not self.ctx:
                raise BundleError(f"llama.cpp could not create a context of {self.n_ctx} tokens for {path}")
            self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
            self.adapter_writer = LoraAdapterWriter(
                self.layout,
                lora_alpha(manifest.peft.config),
                L.llama_model_n_head(self.model),
                L.llama_model_n_head_kv(self.model),
            )
            self.batch = L.llama_batch_init(self.n_ctx, 0, 1)
        except BaseException:
            self.close()
            raise
        self._adapter_path = self._tmp / "theta.gguf"

    # ----- θ -----
    def set_theta(self, theta: np.ndarray) -> None:
        """Make θ the context's only LoRA adapter (a rewritten adapter file, loaded afresh)."""
        L = self.L
        self.layout.check(theta)
        self.adapter_writer.write(self._adapter_path, theta)
        adapter = L.llama_adapter_lora_init(self.model, str(self._adapter_path).encode())
        if not adapter:
            raise BundleError("llama.cpp rejected the LoRA adapter built from θ; does the GGUF match this bundle?")
        scale = (ctypes.c_float * 1)(1.0)  # llama.cpp itself multiplies by alpha / r
        if L.llama_set_adapters_lora(self.ctx, (L.llama_adapter_lora_p_ctypes * 1)(adapter), 1, scale) != 0:
            L.llama_adapter_lora_free(adapter)
            raise BundleError("llama.cpp could not apply the LoRA adapter")
        if self._adapter:
            L.llama_adapter_lora_free(self._adapter)
        self._adapter = adapter

    # ----- loss -----
    def losses(self, batch: Mapping[str, np.ndarray], thetas: np.ndarray) -> np.ndarray:
        """Mean token cross-entropy over the labelled tokens of ``batch``, one per row of ``thetas``."""
        thetas = np.atleast_2d(np.asarray(thetas, dtype=np.float32))
        self.layout.check(thetas)
        sequences = self._sequences(batch)
        out = np.empty(len(thetas), dtype=np.float32)
        for p, theta in enumerate(thetas):
            self.set_theta(theta)
            total, count = 0.0, 0
            for tokens, targets, where in sequences:
                nll = self.token_nll(tokens, where, targets)
                total += float(nll.sum())
                count += nll.size
            out[p] = total / count
        return out

    def _sequences(self, batch: Mapping[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per sequence: its tokens, the labelled targets, and the positions whose logits predict them."""
        missing = {"input_ids", "labels"} - set(batch)
        if missing:
            raise UserError(f"a causal-LM batch needs input_ids and labels; it lacks {sorted(missing)}")
        ids = np.asarray(batch["input_ids"])
        labels = np.asarray(batch["labels"])
        mask = np.asarray(batch.get("attention_mask", np.ones_like(ids)))
        if ids.ndim != 2 or labels.shape != ids.shape or mask.shape != ids.shape:
            raise UserError(f"input_ids, attention_mask and labels must share one [B, S] shape; got {ids.shape}, {mask.shape}, {labels.shape}")
        out = []
        for row_ids, row_labels, row_mask in zip(ids, labels, mask):
            keep = row_mask.astype(bool)
            tokens, targets = row_ids[keep].astype(np.int32), row_labels[keep]
            if tokens.size > self.n_ctx:
                raise UserError(f"a sequence has {tokens.size} tokens, more than this context's {self.n_ctx}; truncate the data")
            where = np.flatnonzero(targets[1:] != IGNORE_INDEX)  # logits at t predict token t+1
            if where.size:
                if targets[where + 1].max() >= self.n_vocab or targets[where + 1].min() < 0:
                    raise UserError(f"a label is outside the model's vocabulary of {self.n_vocab} tokens")
                out.append((tokens, targets[where + 1].astype(np.int64), where))
        if not out:
            raise UserError("the batch has no labelled tokens (every label is -100); nothing to compute a loss on")
        return out

    def token_nll(self, tokens: np.ndarray, where: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """−log p(targets[i] | tokens[: where[i] + 1]) under the current θ, one llama_decode."""
        logits = self.logits(tokens, where)
        shifted = logits - logits.max(axis=1, keepdims=True)
        logz = np.log(np.exp(shifted).sum(axis=1))
        return logz - shifted[np.arange(len(where)), targets]

    def logits(self, tokens: np.ndarray, where: np.ndarray) -> np.ndarray:
        """Logits [len(where), vocab] at the positions ``where`` of one sequence, as float64."""
        L, b = self.L, self.batch
        n = int(tokens.size)
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        b.n_tokens = n
        want = np.zeros(n, dtype=np.int8)
        want[where] = 1
        for i in range(n):
            b.token[i] = int(tokens[i])
            b.pos[i] = i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = int(want[i])
        rc = L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")
        ptr = L.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(len(where), self.n_vocab)).astype(np.float64)

    def close(self) -> None:
        L = self.L
        if getattr(self, "batch", None) is not None:
            L.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            L.llama_set_adapters_lora(self.ctx, None, 0, None)
            L.llama_free(self.ctx)
            self.ctx = None
        if self._adapter:
            L.llama_adapter_lora_free(self._adapter)
            self._adapter = None
        if self.model:
            L.llama_model_free(self.model)
            self.model = None
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "LlamaCppBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "L", None) is not None:
            self.close()
