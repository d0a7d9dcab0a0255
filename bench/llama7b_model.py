"""LLaMA-7B on paper, the arithmetic: decoder shapes, parameter and FLOP counts, and the rules that scale
SmolLM2-135M's measured per-layer and fixed costs to LLaMA-7B (bench/llama7b.py measures, this module scales).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BATCH, SEQ, LORA_R = 8, 64, 8
GB, MIB = 1e9, 2**20


@dataclass(frozen=True)
class Decoder:
    """The shapes of a llama decoder that set its FLOPs and parameter count."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int
    tied: bool  # the LM head is the embedding matrix

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.hidden // self.heads


SMOLLM2 = Decoder(hidden=576, intermediate=1536, heads=9, kv_heads=3, layers=30, vocab=49152, tied=True)
LLAMA_7B = Decoder(hidden=4096, intermediate=11008, heads=32, kv_heads=32, layers=32, vocab=32000, tied=False)
HF_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "num_hidden_layers",
    "vocab_size",
    "tie_word_embeddings",
)  # Decoder's fields in a Hugging Face config.json

# Bits per weight (layers, embedding, LM head) of each configuration. GGUF: llama.cpp's quantize README (q4_0 4.5,
# q8_0 8.5). ONNX int8 is ONNX Runtime's dynamic quantization: MatMul weights in int8, the embedding's Gather in fp32.
BITS = {
    ("llama.cpp", "q4_0"): (4.5, 4.5, 4.5),
    ("llama.cpp", "q8_0"): (8.5, 8.5, 8.5),
    ("onnxruntime", "fp32"): (32, 32, 32),
    ("onnxruntime", "int8"): (8, 32, 8),
}
# The paper's LLaMA-7B peak memory (Table 7, Pixel 7 Pro), beside the configuration nearest its precision.
PAPER_GB = {
    ("llama.cpp", "q4_0"): "4.0 (INT4, GPTQ)",
    ("llama.cpp", "q8_0"): "7.9 (INT8)",
    ("onnxruntime", "int8"): "7.9 (INT8)",
    ("onnxruntime", "fp32"): "15.6 (FP16)",
}
# Phone cores, assumed, not measured: SIMD bits per cycle and GHz. Cortex-X1: 4 × 128-bit NEON pipes (Arm's description)
# at 2.85 GHz (the Pixel 7 Pro's big cores); A78 class: 2 × 128-bit at the 2.35 GHz of its mid cores (A76s, as wide).
PHONE_CORES = {"X1": (4 * 128, 2.85), "A78": (2 * 128, 2.35)}
HOST_PIPES = 2  # vector multiply-add pipes assumed per core of this machine (x86 server cores have two)


def layer_matmul_params(c: Decoder) -> int:
    return 2 * c.hidden * c.hidden + 2 * c.hidden * c.kv_dim + 3 * c.hidden * c.intermediate  # q o, k v, gate up down


def layer_params(c: Decoder) -> int:
    return layer_matmul_params(c) + 2 * c.hidden  # + the two RMSNorm weights


def params(c: Decoder) -> int:
    return c.layers * layer_params(c) + c.vocab * c.hidden * (1 if c.tied else 2) + c.hidden


def lora_values(c: Decoder, r: int = LORA_R) -> int:
    """θ's size: LoRA r on q (hidden → hidden) and v (hidden → kv) of every layer, A and B."""
    return c.layers * r * (3 * c.hidden + c.kv_dim)


def layer_flops(c: Decoder, seq: int = SEQ, r: int = LORA_R) -> int:
    """FLOPs of one layer per token: its matmuls, LoRA's rank-r products on q and v, attention over ``seq`` keys
    (q·k and p·v, no causal saving counted: ONNX Runtime's graph computes the full square)."""
    return 2 * (layer_matmul_params(c) + r * (3 * c.hidden + c.kv_dim) + 2 * seq * c.hidden)


def head_flops(c: Decoder) -> int:
    return 2 * c.hidden * c.vocab


def weight_bytes(c: Decoder, bits: tuple[float, float, float]) -> float:
    """Parameter count × bits per weight (the final norm at the layers' bits); a tied head is stored once."""
    layer, embed, head = bits
    return (
        c.layers * layer_params(c) * layer + c.hidden * layer + c.vocab * c.hidden * (embed + (0 if c.tied else head))
    ) / 8


def kv_bytes_per_layer(c: Decoder, cells: int) -> int:
    return 2 * cells * c.kv_dim * 2  # llama.cpp's K and V of one layer: ``cells`` positions × kv_dim in f16


def activation_bytes(c: Decoder, backend: str, batch: int = BATCH, seq: int = SEQ) -> int:
    """The buffers that grow with the vocabulary and the FFN width, all held at the peak of one evaluation. llama.cpp
    decodes one sequence at a time: ggml's fp32 logits [seq, vocab], the backend's float64 copy and two float64
    temporaries of its log-softmax, the FFN's fp32 [seq, 3 × intermediate]. ONNX Runtime runs the batch in one call:
    fp32 logits [batch, seq, vocab] and their log-softmax, the FFN's fp32 [batch, seq, 3 × intermediate]."""
    if backend == "llama.cpp":
        return seq * c.vocab * (4 + 3 * 8) + seq * 3 * c.intermediate * 4
    return batch * seq * (2 * c.vocab + 3 * c.intermediate) * 4


def seconds_7b(per_layer_s: float, fixed_s: float, src: Decoder = SMOLLM2, dst: Decoder = LLAMA_7B) -> float:
    """dst's time: src's per-layer seconds scaled by layer FLOPs, its fixed seconds by LM-head FLOPs."""
    return dst.layers * per_layer_s * layer_flops(dst) / layer_flops(src) + fixed_s * head_flops(dst) / head_flops(src)


def memory_7b(
    per_layer_bytes: float,
    fixed_bytes: float,
    fixed_weights_src: float,
    backend: str,
    bits: tuple[float, float, float],
    kv_cells: int,
    src: Decoder = SMOLLM2,
    dst: Decoder = LLAMA_7B,
) -> float:
    """dst's peak bytes from src's measured line (``fixed_bytes`` + ``per_layer_bytes`` × layers): the runtime's own
    overhead (src's fixed bytes less its non-layer weights, measured from the files, and its activations), dst's
    non-layer weights and activations, and per layer src's bytes less its KV cache scaled by parameter count (a
    runtime that holds weights twice is scaled as it is) plus dst's KV cache."""
    kv = (kv_bytes_per_layer(src, kv_cells), kv_bytes_per_layer(dst, kv_cells)) if backend == "llama.cpp" else (0, 0)
    overhead = fixed_bytes - fixed_weights_src - activation_bytes(src, backend)
    per_layer = (per_layer_bytes - kv[0]) * layer_params(dst) / layer_params(src) + kv[1]
    dst_fixed = weight_bytes(dst, bits) - dst.layers * layer_params(dst) * bits[0] / 8
    return overhead + dst_fixed + activation_bytes(dst, backend) + dst.layers * per_layer


def phone_factor(host_bits: int, host_ghz: float, core: str) -> float:
    """How many times longer the phone core takes than this machine's core: peak SIMD bits × clock, here / there."""
    bits, ghz = PHONE_CORES[core]
    return host_bits * HOST_PIPES * host_ghz / (bits * ghz)


def fit_line(xs: list[int], ys: list[float]) -> tuple[float, float, float]:
    """Least-squares slope and intercept, and the largest residual as a share of its measurement."""
    slope, intercept = np.polyfit(xs, ys, 1)
    return float(slope), float(intercept), max(abs(slope * x + intercept - y) / y for x, y in zip(xs, ys))
