"""ONNX bundles vs PyTorch: MiniLM (one LoRA top:2 export, reused) and tiny random configs of every architecture × PEFT method."""

from __future__ import annotations

import numpy as np
import pytest

from export_helpers import MINILM, random_batch, rel_err, tiny_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore")


def _export(out, model, task="seq-cls", **kw):
    from fwdllm.export.pipeline import ExportRequest, export
    from fwdllm.export.plan import PeftOptions

    peft = PeftOptions(**{k: kw.pop(k) for k in list(kw) if k in PeftOptions.__dataclass_fields__})
    return export(ExportRequest(model=str(model), task=task, out=out, peft=peft, num_labels=kw.pop("num_labels", 3 if task == "seq-cls" else None), **kw))


def _reference(model_dir, manifest, batch, task="seq-cls"):
    """The HF model's own forward with θ applied (peft LoRA, hooks, HF attention masks)."""
    from fwdllm.export.materialize import reference
    from fwdllm.export.models import load
    from fwdllm.export.plan import PeftOptions, build_plan

    loaded = load(str(model_dir), task)
    p = manifest.peft
    opts = PeftOptions(method=p.method, trainable_layers=p.trainable_layers)
    if p.method == "lora":
        opts.lora_r, opts.lora_alpha, opts.lora_targets = p.config["r"], p.config["alpha"], p.config["targets"]
    if p.method == "adapter":
        opts.adapter_reduction = p.config["reduction"]
    plan = build_plan(loaded.model, task, manifest.model.num_labels, opts)
    assert plan.layout == manifest.theta
    return reference(loaded.model, plan, batch["theta"], batch["input_ids"], batch["attention_mask"], batch["labels"])


@pytest.fixture(scope="session")
def minilm_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm") / "bundle"
    manifest = _export(out, "minilm", method="lora", trainable_layers="top:2", precisions=["fp32", "int8"], num_labels=4)
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
    model = get_peft_model(AutoModel.from_pretrained(str(MINILM)), LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], layers_to_transform=[4, 5]))
    peft_names = {n.replace("base_model.model.", "").replace(".default", "") for n, p in model.named_parameters() if p.requires_grad}
    ours = {s.name for s in manifest.theta.tensors if not s.name.startswith("classifier.")}
    assert ours == peft_names


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
