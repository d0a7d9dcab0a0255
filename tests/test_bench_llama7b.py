"""bench/llama7b_model.py: the arithmetic that turns SmolLM2 measurements into LLaMA-7B estimates, against hand counts.

Every expected value is written out matrix by matrix from the model cards' shapes, not with the module's formulas;
no test times anything.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.llama7b_model import (  # noqa: E402
    BITS,
    LLAMA_7B,
    SMOLLM2,
    activation_bytes,
    fit_line,
    kv_bytes_per_layer,
    layer_flops,
    layer_params,
    lora_values,
    memory_7b,
    params,
    phone_factor,
    seconds_7b,
    weight_bytes,
)

# Multiply-adds of one layer per token, by hand. SmolLM2: q and o 576×576, k and v 576×192 (3 KV heads of 64),
# gate/up/down 576×1536; LoRA r 8 on q (A 8×576, B 576×8) and v (A 8×576, B 192×8); attention q·k and p·v over 64 keys.
SMOL_MACS = (
    576 * 576
    + 576 * 192
    + 576 * 192
    + 576 * 576
    + 3 * 576 * 1536
    + (8 * 576 + 576 * 8)
    + (8 * 576 + 192 * 8)
    + 64 * 576
    + 64 * 576
)
# LLaMA-7B: q, k, v, o 4096×4096 (32 KV heads), gate/up/down 4096×11008, LoRA r 8 on q and v, attention over 64 keys.
LLAMA_MACS = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * (8 * 4096 + 4096 * 8) + 2 * 64 * 4096


def test_layer_flops_are_twice_the_hand_counted_multiply_adds():
    assert SMOL_MACS == 3_628_032 and LLAMA_MACS == 203_030_528
    assert layer_flops(SMOLLM2) == 2 * SMOL_MACS
    assert layer_flops(LLAMA_7B) == 2 * LLAMA_MACS


def test_parameter_counts_match_the_published_sizes():
    # LLaMA-7B: 32 layers of (4·4096² + 3·4096·11008 + two norms of 4096), embedding and LM head 32000×4096, final norm
    assert params(LLAMA_7B) == 32 * (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096) + 2 * 32000 * 4096 + 4096
    assert params(LLAMA_7B) == 6_738_415_616  # "6.7B"
    assert params(SMOLLM2) == 134_515_008  # "135M", the embedding tied to the head
    assert layer_params(SMOLLM2) == 576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536 + 2 * 576


def test_lora_sizes_match_the_bundle_and_the_task():
    assert lora_values(SMOLLM2) == 460_800  # SmolLM2's bundle θ (export/BUNDLE.md)
    assert lora_values(LLAMA_7B) == 32 * 2 * (8 * 4096 + 4096 * 8) == 4_194_304  # "~4.2M"


def test_weights_are_parameters_times_bits():
    assert weight_bytes(LLAMA_7B, BITS["llama.cpp", "q4_0"]) == pytest.approx(6_738_415_616 * 4.5 / 8)  # ≈ 3.79 GB
    assert weight_bytes(LLAMA_7B, BITS["llama.cpp", "q8_0"]) == pytest.approx(6_738_415_616 * 8.5 / 8)
    assert weight_bytes(LLAMA_7B, BITS["onnxruntime", "fp32"]) == pytest.approx(6_738_415_616 * 4)
    # ONNX int8: every MatMul weight (layers, LM head) and the final norm at 1 byte, the embedding at 4
    layers = 32 * (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096)
    assert weight_bytes(LLAMA_7B, BITS["onnxruntime", "int8"]) == pytest.approx(
        layers + 4096 + 32000 * 4096 * 4 + 32000 * 4096
    )


def test_seconds_scale_layers_by_flops_and_the_fixed_part_by_the_head():
    per_layer_s, fixed_s = 0.01, 1.0
    expected = 32 * 0.01 * LLAMA_MACS / SMOL_MACS + 1.0 * (4096 * 32000) / (576 * 49152)
    assert seconds_7b(per_layer_s, fixed_s) == pytest.approx(expected)
    assert expected == pytest.approx(22.5373, abs=1e-4)


def test_memory_with_formula_sized_layers_is_weights_plus_kv_plus_activations_plus_overhead():
    """A runtime whose measured bytes per layer are exactly its weights at 4.5 bits plus its KV cache extrapolates
    to the hand formula: overhead + 7B weights + 7B activations + 32 layers of 7B KV cache."""
    overhead, fixed_weights_smol, cells = 100e6, 30e6, 256
    kv_smol = 2 * cells * 192 * 2  # K and V, 256 cells × 192 values, f16
    kv_7b = 2 * cells * 4096 * 2
    assert kv_bytes_per_layer(SMOLLM2, cells) == kv_smol and kv_bytes_per_layer(LLAMA_7B, cells) == kv_7b
    act_smol = 64 * 49152 * (4 + 3 * 8) + 64 * 3 * 1536 * 4  # logits fp32 + three float64 copies, FFN buffers
    act_7b = 64 * 32000 * (4 + 3 * 8) + 64 * 3 * 11008 * 4
    assert activation_bytes(SMOLLM2, "llama.cpp") == act_smol and activation_bytes(LLAMA_7B, "llama.cpp") == act_7b
    per_layer = (576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536 + 2 * 576) * 4.5 / 8 + kv_smol
    got = memory_7b(
        per_layer,
        overhead + fixed_weights_smol + act_smol,
        fixed_weights_smol,
        "llama.cpp",
        BITS["llama.cpp", "q4_0"],
        cells,
    )
    assert got == pytest.approx(overhead + 6_738_415_616 * 4.5 / 8 + act_7b + 32 * kv_7b)
    assert got == pytest.approx(4_090_374_656)


def test_onnx_runtime_has_no_kv_cache_and_batch_wide_activations():
    assert activation_bytes(LLAMA_7B, "onnxruntime") == 8 * 64 * (2 * 32000 + 3 * 11008) * 4
    per_layer = (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096) / ((576 * 576 + 576 * 192) * 2 + 3 * 576 * 1536 + 2 * 576)
    got = memory_7b(1e6, 5e8, 1e8, "onnxruntime", BITS["onnxruntime", "fp32"], 256)
    act_smol = 8 * 64 * (2 * 49152 + 3 * 1536) * 4
    expected = (
        (5e8 - 1e8 - act_smol)
        + (2 * 32000 * 4096 + 4096) * 4
        + 8 * 64 * (2 * 32000 + 3 * 11008) * 4
        + 32 * 1e6 * per_layer
    )
    assert got == pytest.approx(expected)


def test_phone_factor_is_simd_width_times_clock_here_over_there():
    # this core: 256-bit vectors × 2 pipes at 2.6 GHz; X1: 4 × 128-bit at 2.85 GHz; A78-class: 2 × 128-bit at 2.35 GHz
    assert phone_factor(256, 2.6, "X1") == pytest.approx(256 * 2 * 2.6 / (512 * 2.85))
    assert phone_factor(256, 2.6, "A78") == pytest.approx(256 * 2 * 2.6 / (256 * 2.35))


def test_fit_line_recovers_slope_and_intercept():
    slope, intercept, residual = fit_line([2, 16, 30], [0.5 + 0.1 * 2, 0.5 + 0.1 * 16, 0.5 + 0.1 * 30])
    assert slope == pytest.approx(0.1) and intercept == pytest.approx(0.5) and residual < 1e-9
    *_, residual = fit_line([2, 16, 30], [1.0, 2.0, 4.0])
    assert residual > 0.05
