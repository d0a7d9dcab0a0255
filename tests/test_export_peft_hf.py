"""`fwdllm export-peft` of a MiniLM classifier, loaded by the stock Hugging Face classes as a user would: every
route gives the bundle's ONNX logits for the trained θ, the labels are the bundle's, and no file names a path of
this machine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from export_helpers import MINILM, export_bundle, random_batch, tiny_checkpoint, tiny_llama_checkpoint

from fwdllm.errors import UserError
from fwdllm.proto.manifest import save_theta

pytestmark = pytest.mark.filterwarnings("ignore")

LABELS = ["business", "sport", "tech"]
TOL = 1e-5
HUB_ID = "me/minilm-bbc"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A MiniLM LoRA bundle (top 2 layers), a θ with non-trivial LoRA and head in a simulate-like run folder,
    and its export-peft adapter and merged folders (through the CLI)."""
    from fwdllm.cli import main

    tmp = tmp_path_factory.mktemp("minilm-peft")
    manifest = export_bundle(tmp / "b", "minilm", method="lora", trainable_layers="top:2", label_names=LABELS)
    theta = (0.05 * np.random.default_rng(1).standard_normal(manifest.theta.dim)).astype(np.float32)
    run = tmp / "run"
    run.mkdir()
    save_theta(run / "theta.safetensors", manifest.theta, theta)
    settings = {"data": "bbc", "clients": 100, "per_step": 10, "alpha": 0.5, "optimizer": "adam", "lr": 0.03}
    (run / "sim.json").write_text(json.dumps({"config": settings, "token": "not for the card"}))
    (run / "summary.json").write_text(
        json.dumps({"steps": 20, "before": {"accuracy": 0.25}, "after": {"accuracy": 0.9}})
    )
    for name, extra in (("adapter", []), ("merged", ["--merged"]), ("hub", ["--hub-id", HUB_ID])):
        argv = ["export-peft", str(tmp / "b"), "--theta", str(run / "theta.safetensors"), "--out", str(tmp / name)]
        assert main(argv + extra) == 0
    return tmp, manifest, theta


def _bundle_logits(tmp, manifest, batch, theta):
    from fwdllm.export.onnx_graphs import run

    return run(tmp / "b" / manifest.graph("onnx").file, dict(batch, theta=theta[None, :]))["logits"][0]


def _logits(model, batch):
    ids, mask = (torch.from_numpy(batch[k]) for k in ("input_ids", "attention_mask"))
    with torch.no_grad():
        return model.eval()(input_ids=ids, attention_mask=mask).logits.numpy()


def _without_lora(manifest, theta):
    theta = theta.copy()
    for s in manifest.theta.tensors:
        if ".lora_" in s.name:
            theta[s.offset : s.offset + s.size] = 0.0
    return theta


def test_the_adapter_folder_loads_as_a_sequence_classifier_with_the_bundles_logits(trained):
    from transformers import AutoModelForSequenceClassification

    tmp, manifest, theta = trained
    cfg = json.loads((tmp / "adapter" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["classifier"]
    from safetensors import safe_open

    with safe_open(str(tmp / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.bert.encoder.layer.5.attention.self.query.lora_A.weight" in keys
    assert "base_model.model.classifier.weight" in keys
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp / "adapter"), trust_remote_code=True)
    assert model.config.id2label == dict(enumerate(LABELS)) and model.config.label2id == {
        x: i for i, x in enumerate(LABELS)
    }
    batch = random_batch(manifest, rows=1, seed=2)
    want = _bundle_logits(tmp, manifest, batch, theta)
    got = _logits(model, batch)
    assert np.abs(got - want).max() <= TOL
    # LoRA is applied: without it the bundle's logits move far beyond the tolerance
    assert np.abs(_bundle_logits(tmp, manifest, batch, _without_lora(manifest, theta)) - want).max() > 1e-2


def test_the_adapter_applies_to_the_public_base_checkpoint_with_peft(trained):
    """PeftModel over the published all-MiniLM-L6-v2 weights (the package holds that repository's files), built as
    the folder's mean-pooling class: peft's keys, the LoRA and the trained classifier all land."""
    from peft import PeftModel
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    tmp, manifest, theta = trained
    folder = str(tmp / "adapter")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    cls = get_class_from_dynamic_module(config.auto_map["AutoModelForSequenceClassification"], folder)
    base = cls.from_pretrained(str(MINILM), config=config)
    model = PeftModel.from_pretrained(base, folder)
    batch = random_batch(manifest, rows=1, seed=3)
    assert np.abs(_logits(model, batch) - _bundle_logits(tmp, manifest, batch, theta)).max() <= TOL


def test_a_folder_exported_for_the_hub_loads_by_its_repository_name(trained, tmp_path, monkeypatch):
    """Uploaded to HUB_ID (here: laid out as huggingface_hub caches a download), AutoPeftModelForSequenceClassification
    and AutoModelForSequenceClassification load base and adapter by the repository's name. Offline, as a machine that
    downloaded the repository would be (peft asks the Hub about the adapter file otherwise)."""
    import shutil

    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoModelForSequenceClassification

    tmp, manifest, theta = trained
    assert json.loads((tmp / "hub" / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_ID
    repo = tmp_path / f"models--{HUB_ID.replace('/', '--')}"
    shutil.copytree(tmp / "hub", repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    batch = random_batch(manifest, rows=1, seed=5)
    want = _bundle_logits(tmp, manifest, batch, theta)
    for auto in (AutoPeftModelForSequenceClassification, AutoModelForSequenceClassification):
        model = auto.from_pretrained(HUB_ID, trust_remote_code=True, cache_dir=str(tmp_path), local_files_only=True)
        assert np.abs(_logits(model, batch) - want).max() <= TOL, auto.__name__


def test_without_trust_remote_code_transformers_refuses_instead_of_pooling_the_cls_token(trained):
    from transformers import AutoModelForSequenceClassification

    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForSequenceClassification.from_pretrained(str(trained[0] / "merged"))


def test_merged_checkpoint_in_a_pipeline_gives_the_bundles_labels_and_scores(trained):
    from tokenizers import Tokenizer
    from transformers import pipeline

    tmp, manifest, theta = trained
    texts = ["Shares rose after the quarterly results.", "The striker scored twice in the final minutes.", "ok"]
    classify = pipeline("text-classification", model=str(tmp / "merged"), trust_remote_code=True, top_k=None)
    got = classify(texts)
    tok = Tokenizer.from_file(str(tmp / "b" / "tokenizer.json"))
    tok.enable_padding()
    enc = tok.encode_batch(texts)
    batch = {
        "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
        "labels": np.zeros(len(texts), dtype=np.int64),
    }
    logits = _bundle_logits(tmp, manifest, batch, theta)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for row, want in zip(got, probs):
        scores = {r["label"]: r["score"] for r in row}
        assert set(scores) == set(LABELS)
        assert np.abs(np.array([scores[x] for x in LABELS]) - want).max() <= TOL


def test_model_cards_name_the_public_base_the_method_the_training_and_the_accuracy(trained):
    tmp = trained[0]
    for name in ("adapter", "merged"):
        card = (tmp / name / "README.md").read_text()
        assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card
        facts = ("LoRA", "forward gradients", "fwdllm", "`bbc`", "adam", "0.900", "`business`, `sport`, `tech`")
        for fact in facts:
            assert fact in card, fact
        assert "None" not in card and "not for the card" not in card
    cfg = json.loads((tmp / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"


def _strings_of(path: Path) -> list[str]:
    """Every piece of text a user could see in an exported file: the file itself, or a GGUF's string metadata."""
    if path.suffix == ".gguf":
        import gguf

        out = []
        for field in gguf.GGUFReader(str(path)).fields.values():
            value = field.contents()
            out.extend(str(v) for v in (value if isinstance(value, list) else [value]))
        return out
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "np") as f:
            return [json.dumps(f.metadata() or {})]
    return [path.read_text(errors="replace")]


def _machine_paths(*roots: Path) -> list[str]:
    import fwdllm

    paths = {str(Path.home()), str(Path(fwdllm.__file__).resolve().parents[1]), str(MINILM), *map(str, roots)}
    return sorted(p for p in paths if len(p) > 4)


def test_no_exported_file_names_a_path_of_this_machine(trained, tmp_path):
    """The MiniLM folders above and tiny-BERT BitFit and bottleneck-adapter exports (a checkpoint folder, not a
    shipped default)."""
    from fwdllm.export.peft_out import export_peft

    tmp = trained[0]
    ckpt = tiny_checkpoint("bert", tmp_path / "my-bert")
    for method in ("bitfit", "adapter"):
        manifest = export_bundle(tmp_path / f"b-{method}", ckpt, method=method, trainable_layers="top:1")
        theta = tmp_path / f"theta-{method}.safetensors"
        save_theta(theta, manifest.theta, np.zeros(manifest.theta.dim, np.float32))
        export_peft(tmp_path / f"b-{method}", theta, tmp_path / method)
        assert "base_model: my-bert" in (tmp_path / method / "README.md").read_text()
    assert json.loads((tmp_path / "adapter" / "fwdllm_adapter.json").read_text())["base_model"] == "my-bert"
    folders = [tmp / "adapter", tmp / "merged", tmp / "hub", tmp_path / "bitfit", tmp_path / "adapter"]
    found = [
        (f.name, p)
        for folder in folders
        for f in folder.iterdir()
        for text in _strings_of(f)
        for p in _machine_paths(tmp, tmp_path)
        if p in text
    ]
    assert not found


def test_export_from_the_written_adapter_keeps_its_trained_classifier(trained, tmp_path):
    """export-peft -> export --from-peft-adapter: the new bundle starts at the trained θ (LoRA and head), so its graph
    gives the same logits."""
    from fwdllm.proto.manifest import load_manifest, load_theta

    tmp, manifest, theta = trained
    again = export_bundle(
        tmp_path / "b2", "minilm", from_peft_adapter=str(tmp / "adapter"), trainable_layers="top:2", num_labels=None
    )
    assert again.model.labels == LABELS  # taken from the folder, as the head is
    start = load_theta(tmp_path / "b2", load_manifest(tmp_path / "b2"))
    batch = random_batch(manifest, rows=1, seed=4)
    from fwdllm.export.onnx_graphs import run

    got = run(tmp_path / "b2" / again.graph("onnx").file, dict(batch, theta=start[None, :]))["logits"][0]
    assert np.abs(got - _bundle_logits(tmp, manifest, batch, theta)).max() <= TOL


def test_a_classifier_trained_on_the_cls_pooler_is_refused(tmp_path):
    """A stock peft SEQ_CLS adapter (BertForSequenceClassification pools the CLS token) cannot start fwdllm's
    mean-pooling head: the export stops and says how to keep the LoRA weights alone."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    ckpt = tiny_checkpoint("bert", tmp_path / "tiny")
    stock = AutoModelForSequenceClassification.from_pretrained(str(ckpt), num_labels=3)
    get_peft_model(stock, LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"], r=4)).save_pretrained(
        str(tmp_path / "stock")
    )
    with pytest.raises(UserError, match="CLS pooler.*without modules_to_save"):
        export_bundle(tmp_path / "b", ckpt, from_peft_adapter=str(tmp_path / "stock"))


def test_decoder_exports_and_the_bundles_gguf_name_no_path_of_this_machine(tmp_path):
    """A tiny llama checkpoint folder (SmolLM2's BPE vocabulary, so it has a GGUF): the bundle's GGUF, export-peft's
    llama.cpp adapter, peft adapter and merged checkpoint all call the base by the folder's name."""

    import gguf

    from fwdllm.export.peft_out import export_peft
    from fwdllm.proto.names import Task

    ckpt = tmp_path / "my-llama"
    tiny_llama_checkpoint(ckpt)
    manifest = export_bundle(
        tmp_path / "b",
        ckpt,
        Task.CAUSAL_LM,
        method="lora",
        label_names=["business", "sport"],
        num_labels=None,
        formats=["gguf"],
        precisions=["f16"],
        seq_len=32,
    )
    assert gguf.GGUFReader(str(tmp_path / "b" / "base.f16.gguf")).fields["general.name"].contents() == "my-llama"
    theta = tmp_path / "theta.safetensors"
    save_theta(theta, manifest.theta, np.random.default_rng(0).standard_normal(manifest.theta.dim).astype(np.float32))
    from fwdllm.cli import main

    assert (
        main(
            [
                "export-peft",
                str(tmp_path / "b"),
                "--theta",
                str(theta),
                "--out",
                str(tmp_path / "gguf"),
                "--format",
                "gguf",
            ]
        )
        == 0
    )
    export_peft(tmp_path / "b", theta, tmp_path / "peft")
    export_peft(tmp_path / "b", theta, tmp_path / "merged", merged=True)
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"] == "my-llama"
    files = [
        tmp_path / "b" / "base.f16.gguf",
        *(f for d in ("gguf", "peft", "merged") for f in (tmp_path / d).iterdir()),
    ]
    for f in files:
        if f.suffix == ".md":
            assert "base_model: my-llama" in f.read_text() and "forward gradients" in f.read_text()
    found = [(f.name, p) for f in files for text in _strings_of(f) for p in _machine_paths(tmp_path) if p in text]
    assert not found
