"""ONNX bundles of tiny random configs: every encoder architecture × PEFT method, and a Llama causal LM."""

from __future__ import annotations

import numpy as np
import pytest

from export_helpers import export_bundle as _export, hf_reference as _reference, random_batch, rel_err, tiny_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore")


ARCH_METHODS = [(a, m) for a in ("bert", "distilbert", "albert", "roberta") for m in ("bitfit", "adapter", "lora", "head")]


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

    manifest = _export(tmp_path / "b", tiny_dirs("llama"), task="causal-lm", method="lora", lora_targets=["q_proj", "v_proj", "o_proj"])
    assert [o.name for o in manifest.graph("onnx").outputs] == ["loss"]
    batch = random_batch(manifest, rows=2, seed=3)
    loss, _ = _reference(tiny_dirs("llama"), manifest, batch, task="causal-lm")
    got = run(tmp_path / "b" / manifest.graph("onnx").file, batch)
    assert rel_err(got["loss"], loss) <= 1e-4
