"""Prefix reuse on llama.cpp: a cut label-word bundle runs its frozen layers once per example.

θ of a ``top:K`` bundle lies in the top K layers, so the residual stream below them is the
same for every perturbation. llama.cpp has no call that stops or starts a pass at a layer,
but two public hooks make one:

- **prefix**: the scheduler's eval callback (``llama_context_params.cb_eval``) is asked about
  every tensor of the base model's pass; it claims the residual stream after the last frozen
  layer (llama.cpp names it ``l_out-<layer>``), copies it out when it is computed and returns
  false, which ends the pass there, so the layers above and the vocabulary head never run;
- **suffix**: a batch may carry embeddings instead of token ids (``llama_batch.embd``), and a
  llama model adds nothing to them before its first layer. The suffix GGUF holds the base
  file's top K blocks renumbered from 0 and only the label words' output rows
  (``export/gguf_suffix.py``); fed the stored hidden states it returns the C label logits,
  with θ as a LoRA adapter named for its renumbered blocks.

Both halves run the base file's own tensors and kernels, so prefix→suffix equals the uncut
model bit for bit at every precision (tests/test_llama_prefix_reuse.py); the speed-up is
measured by bench/llama_prefix.py and quoted in export/BUNDLE.md.
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict
from typing import Any

import numpy as np

from fwdllm.device_runtime.backend import BackendError
from fwdllm.device_runtime.graph_backend import PREFIX_CACHE_MB
from fwdllm.device_runtime.llama_ctypes import LoraSlot, decode, new_context
from fwdllm.proto.manifest import BundleError, GraphSpec


def _ggml():
    """ggml's tensor accessors (name, element count, copy out) from the library llama_cpp loaded."""
    from llama_cpp._ggml import libggml as g

    g.ggml_get_name.restype, g.ggml_get_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    g.ggml_nelements.restype, g.ggml_nelements.argtypes = ctypes.c_int64, [ctypes.c_void_p]
    g.ggml_nbytes.restype, g.ggml_nbytes.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
    g.ggml_backend_tensor_get.restype = None
    g.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    return g


class HiddenCache:
    """Per-example hidden states keyed by the example's tokens, least recently used dropped beyond a byte limit.

    A device keeps its local examples' prefix outputs for the whole run (SmolLM2, 40 tokens: 92 KB
    an example), as the ONNX/TFLite backends do.
    """

    def __init__(self, limit_bytes: int):
        self.limit, self.bytes = limit_bytes, 0
        self._rows: OrderedDict[bytes, np.ndarray] = OrderedDict()

    def get(self, key: bytes) -> np.ndarray | None:
        value = self._rows.get(key)
        if value is not None:
            self._rows.move_to_end(key)
        return value

    def put(self, key: bytes, value: np.ndarray) -> None:
        old = self._rows.pop(key, None)
        self.bytes += value.nbytes - (old.nbytes if old is not None else 0)
        self._rows[key] = value
        while self.bytes > self.limit and len(self._rows) > 1:
            self.bytes -= self._rows.popitem(last=False)[1].nbytes

    def clear(self) -> None:
        self._rows.clear()
        self.bytes = 0


class CutModel:
    """The base model's frozen layers as a cached per-example prefix, the suffix GGUF for every θ row.

    Made by ``LlamaBackend``, whose base model, threads, context length and options it uses; the
    backend writes θ's adapter (named for the suffix's renumbered blocks) and loads it into ``slot``.
    """

    def __init__(self, backend, spec: GraphSpec):
        L = self.L = backend.L
        self.spec, self.layer = spec, int(backend.manifest.cut_layer)
        self.n_embd = L.llama_model_n_embd(backend.model)
        self.n_labels = len(backend.label_ids)
        self.model = self.ctx = self.pctx = None
        self._tbatch: Any = None  # llama_batch structs (ctypes), allocated once the model loads
        self._ebatch: Any = None
        self.slot: LoraSlot | None = None
        self.cache = HiddenCache(int(float(backend.options.get("prefix_cache_mb", PREFIX_CACHE_MB)) * (1 << 20)))
        self.prefix_runs = 0
        self._ggml = _ggml()
        self._want = f"l_out-{self.layer - 1}".encode()
        self._captured: np.ndarray | None = None
        self._tap = L.ggml_backend_sched_eval_callback(self._on_tensor)  # kept: llama.cpp holds the pointer
        try:
            self._open(backend)
        except BaseException:
            self.close()
            raise

    def _open(self, backend) -> None:
        L = self.L
        self.model = backend.load_model(self.spec)
        have = (
            L.llama_model_n_layer(self.model),
            L.llama_model_n_embd(self.model),
            L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model)),
        )
        want = (L.llama_model_n_layer(backend.model) - self.layer, self.n_embd, self.n_labels)
        if have != want:
            raise BundleError(
                f"{self.spec.file} has (layers, width, outputs) {have}, the bundle's cut needs {want}; "
                "re-export the bundle"
            )
        self.pctx = new_context(L, backend.model, backend.n_ctx, backend.threads, self._tap)
        self.ctx = new_context(L, self.model, backend.n_ctx, backend.threads)
        self._tbatch = L.llama_batch_init(backend.n_ctx, 0, 1)
        self._ebatch = L.llama_batch_init(backend.n_ctx, self.n_embd, 1)
        self.slot = LoraSlot(L, self.model, self.ctx)

    # ----- prefix -----
    def _on_tensor(self, tensor, ask: bool, _user) -> bool:
        """Scheduler callback: claim the cut's residual stream; once it is computed, copy it and stop the pass."""
        g = self._ggml
        if ask:
            return g.ggml_get_name(tensor) == self._want
        n = g.ggml_nelements(tensor)
        if g.ggml_nbytes(tensor) != 4 * n or n % self.n_embd:
            return True  # not float32 hidden states: leave the pass alone, hidden() reports it
        out = np.empty((n // self.n_embd, self.n_embd), dtype=np.float32)
        g.ggml_backend_tensor_get(tensor, out.ctypes.data, 0, out.nbytes)
        self._captured = out
        return False

    def hidden(self, tokens: np.ndarray) -> np.ndarray:
        """The residual stream after layer ``cut_layer − 1`` at every token [n, n_embd], cached by the tokens."""
        key = tokens.tobytes()
        value = self.cache.get(key)
        if value is not None:
            return value
        n = int(tokens.size)
        want = np.zeros(n, dtype=np.int8)
        want[-1] = 1  # llama.cpp wants one output; the pass stops before it is computed
        for i in range(n):
            self._tbatch.token[i] = int(tokens[i])
        self._captured = None
        decode(self.L, self.pctx, self._tbatch, n, want)
        value, self._captured = self._captured, None
        if value is None or value.shape[0] != n:
            raise BackendError(
                f"llama.cpp did not expose the hidden states of layer {self.layer - 1} "
                f"({self._want.decode()}) for {n} tokens; open the backend with prefix_reuse=False"
            )
        self.prefix_runs += 1
        self.cache.put(key, value)
        return value

    # ----- suffix -----
    def label_logits(self, tokens: np.ndarray) -> np.ndarray:
        """The C label words' logits after ``tokens`` under the suffix's current adapter, float64."""
        hidden = self.hidden(tokens)
        n = hidden.shape[0]
        ctypes.memmove(self._ebatch.embd, hidden.ctypes.data, hidden.nbytes)
        want = np.zeros(n, dtype=np.int8)
        want[-1] = 1
        decode(self.L, self.ctx, self._ebatch, n, want)
        return np.ctypeslib.as_array(self.L.llama_get_logits(self.ctx), shape=(self.n_labels,)).astype(np.float64)

    def close(self) -> None:
        L = self.L
        if self.slot is not None:
            self.slot.close()
            self.slot = None
        for batch in (self._tbatch, self._ebatch):
            if batch is not None:
                L.llama_batch_free(batch)
        self._tbatch = self._ebatch = None
        for ctx in (self.pctx, self.ctx):
            if ctx:
                L.llama_free(ctx)
        self.pctx = self.ctx = None
        if self.model:
            L.llama_model_free(self.model)
            self.model = None
        self.cache.clear()
