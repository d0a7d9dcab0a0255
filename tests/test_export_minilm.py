"""MiniLM bundles vs PyTorch: one LoRA top:2 export with ONNX and TFLite at fp32 and int8, reused by every test."""

from __future__ import annotations

import numpy as np
import pytest
from export_helpers import MINILM, random_batch, rel_err
from export_helpers import export_bundle as _export
from export_helpers import hf_reference as _reference

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="session")
def minilm_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm") / "bundle"
    manifest = _export(
        out,
        "minilm",
        method="lora",
        trainable_layers="top:2",
        formats=["onnx", "tflite"],
        precisions=["fp32", "fp16", "int8"],
        num_labels=4,
        batch_size=3,
        seq_len=12,
        perturbations=3,
    )
    return out, manifest


@pytest.fixture(scope="session")
def minilm_reference(minilm_bundle):
    out, manifest = minilm_bundle
    batch = random_batch(manifest, rows=3, seed=11)
    return batch, _reference(MINILM, manifest, batch)


def test_minilm_full_graph_matches_pytorch(minilm_bundle, minilm_reference):
    from fwdllm.export.onnx_graphs import run

    out, manifest = minilm_bundle
    batch, (loss, logits) = minilm_reference
    got = run(out / manifest.graph("onnx", "full", "fp32").file, batch)
    assert got["loss"].shape == (3,) and got["logits"].shape == (3, 3, 4)
    assert rel_err(got["loss"], loss) <= 1e-4
    assert rel_err(got["logits"], logits) <= 1e-4
    # θ rows differ, so their losses must differ: the graph really reads θ.
    assert np.ptp(got["loss"]) > 1e-3


def test_minilm_int8_within_stated_tolerance(minilm_bundle, minilm_reference):
    from fwdllm.export.onnx_graphs import TOLERANCE, run

    out, manifest = minilm_bundle
    batch, (loss, logits) = minilm_reference
    g = manifest.graph("onnx", "full", "int8")
    got = run(out / g.file, batch)
    assert rel_err(got["logits"], logits) <= TOLERANCE["int8"]
    assert g.validation["max_rel_err"] <= TOLERANCE["int8"]


def test_p_batched_equals_single_calls(minilm_bundle, minilm_reference):
    from fwdllm.export.onnx_graphs import run

    out, manifest = minilm_bundle
    batch, _ = minilm_reference
    path = out / manifest.graph("onnx", "full", "fp32").file
    together = run(path, batch)
    for i in range(batch["theta"].shape[0]):
        single = run(path, dict(batch, theta=batch["theta"][i : i + 1]))
        np.testing.assert_allclose(single["loss"][0], together["loss"][i], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(single["logits"][0], together["logits"][i], rtol=1e-5, atol=1e-6)


def test_prefix_then_suffix_equals_full(minilm_bundle, minilm_reference):
    from fwdllm.export.onnx_graphs import run

    out, manifest = minilm_bundle
    batch, _ = minilm_reference
    assert manifest.cut_layer == 4
    for precision in ("fp32", "int8"):
        full = run(out / manifest.graph("onnx", "full", precision).file, batch)
        hidden = run(out / manifest.graph("onnx", "prefix", precision).file, batch)["hidden"]
        assert hidden.shape == (3, 12, 384)
        split = run(out / manifest.graph("onnx", "suffix", precision).file, dict(batch, hidden=hidden))
        np.testing.assert_allclose(split["loss"], full["loss"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(split["logits"], full["logits"], rtol=1e-5, atol=1e-6)


def test_frozen_matmuls_keep_constant_weights(minilm_bundle):
    """Every MatMul either has an initializer weight or reads θ on a small op (≤ rank/labels wide)."""
    import onnx

    out, manifest = minilm_bundle
    g = onnx.load(str(out / manifest.graph("onnx", "full", "fp32").file), load_external_data=False).graph
    inits = {i.name for i in g.initializer}
    const = sum(1 for n in g.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits)
    assert const >= 6 * 6  # q, k, v, o, ffn in, ffn out per layer
    assert [i.name for i in g.input] == ["input_ids", "attention_mask", "labels", "theta"]


def test_lora_sites_are_the_ones_peft_picks(minilm_bundle):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    _, manifest = minilm_bundle
    model = get_peft_model(
        AutoModel.from_pretrained(str(MINILM)),
        LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], layers_to_transform=[4, 5]),
    )
    peft_names = {
        n.replace("base_model.model.", "").replace(".default", "")
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    ours = {s.name for s in manifest.theta.tensors if not s.name.startswith("classifier.")}
    assert ours == peft_names


def test_tflite_graphs_match_pytorch_and_onnx(minilm_bundle, minilm_reference):
    from fwdllm.export import tflite_graphs

    out, manifest = minilm_bundle
    batch, (loss, logits) = minilm_reference
    g = manifest.graph("tflite", "full", "fp32")
    assert (g.batch_size, g.seq_len, g.perturbations) == (3, 12, 3)
    assert [t.dtype for t in g.inputs[:3]] == ["int32"] * 3
    got = tflite_graphs.run(out / g.file, batch)
    assert rel_err(got["loss"], loss) <= 1e-4
    assert rel_err(got["logits"], logits) <= 1e-4
    for precision in ("fp16", "int8"):
        q = tflite_graphs.run(out / manifest.graph("tflite", "full", precision).file, batch)
        assert rel_err(q["logits"], logits) <= tflite_graphs.TOLERANCE[precision]
        assert rel_err(q["logits"], logits) > 0  # really a different graph
    hidden = tflite_graphs.run(out / manifest.graph("tflite", "prefix", "fp32").file, batch)["hidden"]
    split = tflite_graphs.run(out / manifest.graph("tflite", "suffix", "fp32").file, dict(batch, hidden=hidden))
    np.testing.assert_allclose(split["loss"], got["loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(split["logits"], got["logits"], rtol=1e-5, atol=1e-6)


def test_tflite_xnnpack_takes_the_frozen_matmuls(minilm_bundle):
    """All frozen FULLY_CONNECTED ops are delegated; only glue (lookup, casts, the label gather) is left."""
    _, manifest = minilm_bundle
    for role in ("full", "prefix", "suffix"):
        d = manifest.graph("tflite", role, "fp32").delegation
        assert d["xnnpack"] >= 0.9 * d["ops"]
        assert "FULLY_CONNECTED" not in d["builtin"] and "BATCH_MATMUL" not in d["builtin"]


def test_inspect_prints_graphs_and_delegation(minilm_bundle, capsys):
    from fwdllm.cli import main

    out, manifest = minilm_bundle
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "XNNPACK takes" in text and "cut    prefix graphs run embeddings + 4 layers" in text
    assert main(["inspect", str(out), "--json"]) == 0
    import json

    assert json.loads(capsys.readouterr().out)["theta"]["dim"] == manifest.theta.dim
