"""`fwdllm export-peft` round trip: the HF model loaded with peft/transformers from the written folder
gives the bundle graph's logits (loss for causal LM) for the same θ."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from export_helpers import export_bundle, random_batch, rel_err, tiny_checkpoint

from fwdllm.proto.names import Task

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    return tiny_checkpoint("bert", tmp_path_factory.mktemp("tiny-bert"))


def _trained_theta(manifest, path, seed=7):
    from fwdllm.proto.manifest import save_theta

    theta = (0.1 * np.random.default_rng(seed).standard_normal(manifest.theta.dim)).astype(np.float32)
    save_theta(path, manifest.theta, theta)
    return theta


def _graph(bundle, manifest, batch, theta):
    from fwdllm.export.onnx_graphs import run

    return run(bundle / manifest.graph("onnx").file, dict(batch, theta=theta[None, :]))


def _head(folder, hidden, mask):
    from safetensors.torch import load_file

    head = load_file(str(folder / "classifier.safetensors"))
    assert json.loads((folder / "fwdllm_head.json").read_text())["pooling"].startswith("mean")
    m = mask.unsqueeze(-1).float()
    pooled = (hidden * m).sum(1) / m.sum(1)
    return (pooled @ head["weight"].T + head["bias"]).detach().numpy()


def _ids(batch):
    return torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["attention_mask"])


def _classifier_logits(folder, batch):
    """What a user gets: the exported folder as an AutoModelForSequenceClassification (its own pooling code)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(folder), trust_remote_code=True).eval()
    ids, mask = _ids(batch)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.numpy()


@pytest.mark.parametrize("merged", [False, True])
def test_lora_round_trip(tiny_bert, tmp_path, merged):
    from fwdllm.cli import main

    manifest = export_bundle(tmp_path / "b", tiny_bert, method="lora", trainable_layers="top:2")
    theta = _trained_theta(manifest, tmp_path / "theta.safetensors")
    argv = [
        "export-peft",
        str(tmp_path / "b"),
        "--theta",
        str(tmp_path / "theta.safetensors"),
        "--out",
        str(tmp_path / "hf"),
    ]
    assert main(argv + (["--merged"] if merged else [])) == 0
    assert (tmp_path / "hf" / "adapter_config.json").is_file() != merged
    batch = random_batch(manifest, rows=1, seed=2)
    got = _graph(tmp_path / "b", manifest, batch, theta)["logits"][0]
    assert rel_err(got, _classifier_logits(tmp_path / "hf", batch)) <= 1e-5


@pytest.mark.parametrize("arch", ["bert", "distilbert", "albert", "roberta"])
def test_bitfit_round_trip_is_a_classifier_checkpoint(tmp_path, arch):
    """Every encoder architecture's merged folder loads as its mean-pooling classifier class."""
    from fwdllm.export.peft_out import export_peft

    ckpt = tiny_checkpoint(arch, tmp_path / arch)
    manifest = export_bundle(tmp_path / "b", ckpt, method="bitfit")
    theta = _trained_theta(manifest, tmp_path / "theta.safetensors")
    export_peft(tmp_path / "b", tmp_path / "theta.safetensors", tmp_path / "hf")
    batch = random_batch(manifest, rows=1, seed=3)
    got = _graph(tmp_path / "b", manifest, batch, theta)["logits"][0]
    assert rel_err(got, _classifier_logits(tmp_path / "hf", batch)) <= 1e-5


def test_adapter_round_trip_by_its_documented_formula(tiny_bert, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModel

    from fwdllm.export.peft_out import export_peft

    manifest = export_bundle(tmp_path / "b", tiny_bert, method="adapter", adapter_reduction=4)
    theta = _trained_theta(manifest, tmp_path / "theta.safetensors")
    export_peft(tmp_path / "b", tmp_path / "theta.safetensors", tmp_path / "hf")
    doc = json.loads((tmp_path / "hf" / "fwdllm_adapter.json").read_text())
    t = load_file(str(tmp_path / "hf" / "adapter_model.safetensors"))
    model = AutoModel.from_pretrained(str(tiny_bert)).eval()
    for path in doc["modules"]:
        w = [t[f"{path}.adapter.{k}"] for k in ("down.weight", "down.bias", "up.weight", "up.bias")]
        model.get_submodule(path).register_forward_hook(
            lambda m, i, h, w=w: h + torch.relu(h @ w[0].T + w[1]) @ w[2].T + w[3]
        )
    batch = random_batch(manifest, rows=1, seed=4)
    ids, mask = _ids(batch)
    with torch.no_grad():
        logits = _head(tmp_path / "hf", model(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
    assert rel_err(_graph(tmp_path / "b", manifest, batch, theta)["logits"][0], logits) <= 1e-4


def test_llama_lora_round_trip_loss(tmp_path_factory, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fwdllm.export.peft_out import export_peft

    ckpt = tiny_checkpoint("llama", tmp_path_factory.mktemp("tiny-llama"))
    manifest = export_bundle(tmp_path / "b", ckpt, task=Task.CAUSAL_LM, method="lora")
    theta = _trained_theta(manifest, tmp_path / "theta.safetensors")
    export_peft(tmp_path / "b", tmp_path / "theta.safetensors", tmp_path / "hf")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(ckpt)), str(tmp_path / "hf")).eval()
    batch = random_batch(manifest, rows=1, seed=5)
    ids, mask = _ids(batch)
    with torch.no_grad():
        loss = model(input_ids=ids, attention_mask=mask, labels=torch.from_numpy(batch["labels"])).loss.numpy()
    assert rel_err(_graph(tmp_path / "b", manifest, batch, theta)["loss"][0], loss) <= 1e-4


def test_export_starts_from_a_written_peft_adapter(tiny_bert, tmp_path):
    """export -> export-peft -> export --from-peft-adapter gives back θ's LoRA tensors and config."""
    from fwdllm.export.peft_out import export_peft
    from fwdllm.proto.manifest import load_manifest, load_theta

    manifest = export_bundle(
        tmp_path / "b", tiny_bert, method="lora", trainable_layers="top:2", lora_r=4, lora_alpha=8.0
    )
    theta = _trained_theta(manifest, tmp_path / "theta.safetensors")
    export_peft(tmp_path / "b", tmp_path / "theta.safetensors", tmp_path / "hf")
    again = export_bundle(tmp_path / "b2", tiny_bert, from_peft_adapter=str(tmp_path / "hf"), trainable_layers="top:2")
    assert again.peft.config["r"] == 4 and again.peft.config["alpha"] == 8.0
    assert again.theta == manifest.theta
    start = load_theta(tmp_path / "b2", load_manifest(tmp_path / "b2"))
    lora = [s for s in manifest.theta.tensors if ".lora_" in s.name]
    for s in lora:
        np.testing.assert_array_equal(start[s.offset : s.offset + s.size], theta[s.offset : s.offset + s.size])
