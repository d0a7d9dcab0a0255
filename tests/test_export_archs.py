"""ONNX bundles of tiny random configs: every encoder architecture × PEFT method, and a Llama causal LM."""

from __future__ import annotations

import numpy as np
import pytest
from export_helpers import export_bundle as _export
from export_helpers import hf_reference as _reference
from export_helpers import random_batch, rel_err, tiny_checkpoint

from fwdllm.proto.names import Task

pytestmark = pytest.mark.filterwarnings("ignore")


ARCH_METHODS = [
    (a, m) for a in ("bert", "distilbert", "albert", "roberta") for m in ("bitfit", "adapter", "lora", "head")
]


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = tiny_checkpoint(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return cache[arch]

    return get


@pytest.mark.parametrize("arch,method", ARCH_METHODS)
def test_tiny_architectures_match_pytorch(arch, method, tiny_dirs, tmp_path):
    from fwdllm.export.onnx_graphs import run

    layers = "top:1" if method != "head" and arch != "albert" else "all"
    manifest = _export(tmp_path / "b", tiny_dirs(arch), method=method, trainable_layers=layers)
    batch = random_batch(manifest, rows=2, seed=5)
    loss, logits = _reference(tiny_dirs(arch), manifest, batch)
    got = run(tmp_path / "b" / manifest.graph("onnx", "full").file, batch)
    assert rel_err(got["loss"], loss) <= 1e-4
    assert rel_err(got["logits"], logits) <= 1e-4
    if manifest.cut_layer is not None:
        hidden = run(tmp_path / "b" / manifest.graph("onnx", "prefix").file, batch)["hidden"]
        split = run(tmp_path / "b" / manifest.graph("onnx", "suffix").file, dict(batch, hidden=hidden))
        np.testing.assert_allclose(split["loss"], got["loss"], rtol=1e-5, atol=1e-6)


def test_tiny_llama_causal_lm_loss(tiny_dirs, tmp_path):
    from fwdllm.export.onnx_graphs import run

    manifest = _export(
        tmp_path / "b",
        tiny_dirs("llama"),
        task=Task.CAUSAL_LM,
        method="lora",
        lora_targets=["q_proj", "v_proj", "o_proj"],
        trainable_layers="top:1",
    )
    assert [o.name for o in manifest.graph("onnx").outputs] == ["loss"]
    assert manifest.cut_layer == 1
    batch = random_batch(manifest, rows=2, seed=3)
    loss, _ = _reference(tiny_dirs("llama"), manifest, batch, task=Task.CAUSAL_LM)
    got = run(tmp_path / "b" / manifest.graph("onnx").file, batch)
    assert rel_err(got["loss"], loss) <= 1e-4
    hidden = run(tmp_path / "b" / manifest.graph("onnx", "prefix").file, batch)["hidden"]
    split = run(tmp_path / "b" / manifest.graph("onnx", "suffix").file, dict(batch, hidden=hidden))
    np.testing.assert_allclose(split["loss"], got["loss"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "method", ["bitfit", pytest.param("adapter", marks=pytest.mark.slow), pytest.param("head", marks=pytest.mark.slow)]
)
def test_tiny_bert_tflite_per_method(method, tiny_dirs, tmp_path):
    from fwdllm.export import tflite_graphs

    manifest = _export(
        tmp_path / "b",
        tiny_dirs("bert"),
        method=method,
        trainable_layers="all" if method != "head" else "head",
        formats=["tflite"],
        precisions=["fp32"],
        batch_size=3,
        seq_len=12,
        perturbations=2,
    )
    batch = random_batch(manifest, rows=2, seed=6)
    loss, logits = _reference(tiny_dirs("bert"), manifest, batch)
    got = tflite_graphs.run(tmp_path / "b" / manifest.graph("tflite").file, batch)
    assert rel_err(got["loss"], loss) <= 1e-4
    assert rel_err(got["logits"], logits) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("method", ["bitfit", "adapter", "head"])
def test_minilm_every_method_onnx_and_tflite(method, tmp_path):
    """MiniLM × the remaining PEFT methods (LoRA is the fast suite's bundle) in both formats, fp32 and int8."""
    from export_helpers import MINILM

    from fwdllm.export import onnx_graphs, tflite_graphs

    manifest = _export(
        tmp_path / "b",
        MINILM,
        method=method,
        trainable_layers="all" if method != "head" else "head",
        formats=["onnx", "tflite"],
        precisions=["fp32", "int8"],
        batch_size=3,
        seq_len=12,
        perturbations=3,
    )
    batch = random_batch(manifest, rows=3, seed=8)
    loss, logits = _reference(MINILM, manifest, batch)
    for fmt, mod in (("onnx", onnx_graphs), ("tflite", tflite_graphs)):
        for precision in ("fp32", "int8"):
            got = mod.run(tmp_path / "b" / manifest.graph(fmt, "full", precision).file, batch)
            assert rel_err(got["logits"], logits) <= mod.TOLERANCE[precision], (fmt, precision)
            assert rel_err(got["loss"], loss) <= mod.TOLERANCE[precision], (fmt, precision)


@pytest.mark.slow
def test_smollm2_lora_onnx_matches_pytorch(tmp_path):
    from fwdllm.export.onnx_graphs import run

    manifest = _export(tmp_path / "b", "smollm2", task=Task.CAUSAL_LM, method="lora")
    assert manifest.theta.dim == 460_800
    batch = random_batch(manifest, rows=2, seed=9, batch=2, seq=16)
    batch["input_ids"] %= 49152
    batch["labels"] = np.where(batch["attention_mask"] == 1, batch["input_ids"], -100)
    loss, _ = _reference("smollm2", manifest, batch, task=Task.CAUSAL_LM)
    assert rel_err(run(tmp_path / "b" / manifest.graph("onnx").file, batch)["loss"], loss) <= 1e-4


def test_cli_export_then_inspect(tiny_dirs, tmp_path, capsys):
    from fwdllm.cli import main
    from fwdllm.proto.manifest import load_manifest

    out = tmp_path / "b"
    argv = [
        "export",
        "--model",
        str(tiny_dirs("distilbert")),
        "--task",
        "seq-cls",
        "--label-names",
        "neg,neu,pos",
        "--peft",
        "bitfit",
        "--trainable-layers",
        "top:1",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert "cut    prefix graphs run embeddings + 2 layers" in capsys.readouterr().out
    m = load_manifest(out)
    assert m.model.labels == ["neg", "neu", "pos"] and m.model.num_labels == 3 and m.cut_layer == 2
    assert sorted(g.role for g in m.graphs) == ["full", "prefix", "suffix"]
    assert (
        main(
            [
                "export",
                "--model",
                str(tiny_dirs("distilbert")),
                "--task",
                "seq-cls",
                "--labels",
                "2",
                "--format",
                "gguf",
                "--out",
                str(tmp_path / "g"),
            ]
        )
        == 2
    )
    assert "--task causal-lm" in capsys.readouterr().err
