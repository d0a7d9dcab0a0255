"""llama.cpp's C API through llama-cpp-python's ctypes bindings: loading the library with its log routed to
Python's logging, contexts, one batch decode, and a context's single LoRA adapter slot. Shared by the
backend (whole model) and the cut model (prefix and suffix GGUFs).
"""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

import numpy as np

from fwdllm.device_runtime.backend import BackendError
from fwdllm.errors import UserError


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

    # ggml levels: 1 debug, 2 info, 3 warn, 4 error, 5 continuation. Warnings become INFO: the
    # per-tensor LoRA ones ("cannot use buft CPU_REPACK, fallback to CPU") are expected.
    levels = {3: logging.INFO, 4: logging.ERROR}
    llama_log = logging.getLogger("llama.cpp")

    def forward(level: int, text: bytes, _user) -> None:
        py_level = levels.get(level, logging.DEBUG)
        if llama_log.isEnabledFor(py_level):
            llama_log.log(py_level, text.decode("utf-8", "replace").rstrip())

    return L.llama_log_callback(forward)


def new_context(L, model, n_ctx: int, threads: int, cb_eval=None):
    """A one-sequence context of ``n_ctx`` tokens (one ubatch), optionally with a scheduler eval callback."""
    cparams = L.llama_context_default_params()
    cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = n_ctx
    cparams.n_seq_max = 1
    cparams.n_threads = cparams.n_threads_batch = threads
    if cb_eval is not None:
        cparams.cb_eval = cb_eval
    ctx = L.llama_init_from_model(model, cparams)
    if not ctx:
        raise BackendError(f"llama.cpp could not create a context of {n_ctx} tokens")
    return ctx


def decode(L, ctx, b, n: int, want: np.ndarray) -> None:
    """One ``llama_decode`` of the first ``n`` entries of batch ``b`` (tokens or embeddings already
    in it) as one sequence at positions 0..n−1, with logits where ``want`` is set."""
    L.llama_memory_clear(L.llama_get_memory(ctx), True)
    b.n_tokens = n
    for i in range(n):
        b.pos[i] = i
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = 0
        b.logits[i] = int(want[i])
    rc = L.llama_decode(ctx, b)
    if rc != 0:
        raise BackendError(f"llama_decode failed with code {rc} on a {n}-token sequence")


class LoraSlot:
    """One context's only LoRA adapter: each adapter file loaded afresh, the previous adapter freed."""

    def __init__(self, L, model, ctx):
        self.L, self.model, self.ctx = L, model, ctx
        self.adapter = None

    def load(self, path: Path) -> None:
        L = self.L
        adapter = L.llama_adapter_lora_init(self.model, str(path).encode())
        if not adapter:
            raise BackendError("llama.cpp rejected the LoRA adapter built from θ; does the GGUF match this bundle?")
        scale = (ctypes.c_float * 1)(1.0)  # llama.cpp itself multiplies by alpha / r
        if L.llama_set_adapters_lora(self.ctx, (L.llama_adapter_lora_p_ctypes * 1)(adapter), 1, scale) != 0:
            L.llama_adapter_lora_free(adapter)
            raise BackendError("llama.cpp could not apply the LoRA adapter")
        if self.adapter:
            L.llama_adapter_lora_free(self.adapter)
        self.adapter = adapter

    def close(self) -> None:
        """Detach and free the adapter (before the context and model go)."""
        if self.adapter:
            self.L.llama_set_adapters_lora(self.ctx, None, 0, None)
            self.L.llama_adapter_lora_free(self.adapter)
            self.adapter = None
