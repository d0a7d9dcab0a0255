"""`fwdllm export-inference`: θ folded into plain inference models, run by the stock runtimes.

Each folded model is compared with the bundle's own training graph (ONNX ``full``, θ fed as its
input, LoRA unmerged) evaluated at the same θ, and with that graph at the bundle's θ0, so a model
that ignored θ would fail. Label names are read back with each format's own reader.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from export_helpers import export_bundle, rel_err

from fwdllm.cli import main
from fwdllm.proto.manifest import load_manifest, load_theta, save_theta
from fwdllm.proto.names import Task

pytestmark = pytest.mark.filterwarnings("ignore")

TOPICS = ["business", "entertainment", "politics", "sports", "tech"]
TEXTS = [
    "Shares in the bank rose after the merger was announced.",
    "The film won three awards at the festival last night.",
    "The minister resigned over the budget vote.",
    "The striker scored twice in the second half.",
    "A new phone chip doubles battery life.",
]


def bundle_logits(bundle, feeds: dict, theta: np.ndarray) -> np.ndarray:
    """The bundle's ONNX training graph at one θ row: logits [B, C]."""
    from fwdllm.export.onnx_graphs import run

    n = len(feeds["input_ids"])
    full = dict(feeds, labels=np.zeros(n, np.int64), theta=theta[None].astype(np.float32))
    return run(bundle / load_manifest(bundle).graph("onnx", "full").file, full)["logits"][0]


def trained_theta(bundle, tmp, scale: float, seed: int = 0) -> tuple[np.ndarray, object]:
    manifest = load_manifest(bundle)
    theta = (scale * np.random.default_rng(seed).standard_normal(manifest.theta.dim)).astype(np.float32)
    save_theta(tmp / "trained.safetensors", manifest.theta, theta)
    return theta, tmp / "trained.safetensors"


def export_inference(bundle, theta_file, fmt, out, *extra) -> None:
    argv = ["export-inference", str(bundle), "--theta", str(theta_file), "--format", fmt, "--out", str(out)]
    assert main([*argv, *extra]) == 0


# ----- MiniLM, seq-cls, LoRA on the top 2 layers + the head -------------------------------------


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """A MiniLM LoRA bundle (ONNX), a trained θ and its ONNX and TFLite inference models."""
    root = tmp_path_factory.mktemp("minilm-inference")
    bundle = root / "bundle"
    export_bundle(
        bundle,
        "minilm",
        method="lora",
        trainable_layers="top:2",
        label_names=TOPICS,
        num_labels=5,
        formats=["onnx"],
        seq_len=32,
    )
    theta, theta_file = trained_theta(bundle, root, 0.1)
    export_inference(bundle, theta_file, "onnx", root / "onnx")
    export_inference(bundle, theta_file, "tflite", root / "tflite", "--batch-size", "5", "--seq-len", "24")
    return bundle, theta, root


def tokenize(folder, texts, length):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.enable_truncation(length)
    tok.enable_padding(length=length)
    enc = tok.encode_batch(texts)
    return {
        "input_ids": np.array([e.ids for e in enc], np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
        "token_type_ids": np.array([e.type_ids for e in enc], np.int64),
    }


def test_minilm_onnx_folder_gives_the_bundle_logits_at_theta_and_names_its_labels(minilm):
    import onnx
    import onnxruntime as ort

    bundle, theta, root = minilm
    folder = root / "onnx"
    feeds = tokenize(folder, TEXTS, 20)
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    assert sess.get_outputs()[0].shape == ["batch_size", len(TOPICS)]
    (got,) = sess.run(None, feeds)

    want = bundle_logits(bundle, feeds, theta)
    assert rel_err(got, want) < 1e-5
    base = bundle_logits(bundle, feeds, load_theta(bundle, load_manifest(bundle)))
    assert rel_err(got, base) > 0.1  # θ really is in the weights

    props = {p.key: p.value for p in onnx.load(str(folder / "model.onnx"), load_external_data=False).metadata_props}
    assert json.loads(props["id2label"]) == {str(i): t for i, t in enumerate(TOPICS)}
    config = json.loads((folder / "config.json").read_text())
    assert config["id2label"] == {str(i): t for i, t in enumerate(TOPICS)}
    assert config["architectures"] == ["BertForSequenceClassification"]


def test_minilm_tflite_gives_the_bundle_logits_at_theta_and_names_its_labels(minilm):
    from ai_edge_litert.interpreter import Interpreter

    from fwdllm.export.inference_graphs import tflite_metadata

    bundle, theta, root = minilm
    feeds = tokenize(root / "tflite", TEXTS, 24)
    runner = Interpreter(model_path=str(root / "tflite" / "model.tflite")).get_signature_runner()
    assert sorted(runner.get_input_details()) == ["attention_mask", "input_ids", "token_type_ids"]
    got = runner(**{k: v.astype(np.int32) for k, v in feeds.items()})["logits"]
    assert got.shape == (5, len(TOPICS))
    want = bundle_logits(bundle, feeds, theta)
    assert rel_err(got, want) < 1e-4
    assert rel_err(got, bundle_logits(bundle, feeds, load_theta(bundle, load_manifest(bundle)))) > 0.1
    labels = json.loads(tflite_metadata(root / "tflite" / "model.tflite")["id2label"])
    assert labels == {str(i): t for i, t in enumerate(TOPICS)}


def test_export_inference_refuses_what_it_cannot_write(minilm, tmp_path, capsys):
    bundle, _, root = minilm
    argv = ["export-inference", str(bundle), "--theta", str(root / "trained.safetensors")]
    assert main([*argv, "--format", "onnx", "--precision", "q8_0", "--out", str(tmp_path / "a")]) == 2
    assert "onnx takes fp32, int8" in capsys.readouterr().err
    assert main([*argv, "--format", "gguf", "--out", str(tmp_path / "b")]) == 2
    assert "writes a llama decoder" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ----- a tiny llama answering with label words ------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A tiny random llama with SmolLM2's byte-level BPE vocabulary (so it has a GGUF), LoRA on its top
    layer, BBC topic words, an ONNX bundle, a trained θ, and its folded ONNX and merged f16 GGUF."""
    import torch
    import transformers

    from fwdllm.export.models import resolve

    root = tmp_path_factory.mktemp("tiny-llama-inference")
    ckpt = root / "ckpt"
    cfg = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(ckpt)
    shutil.copyfile(resolve("smollm2")[0] / "tokenizer.json", ckpt / "tokenizer.json")
    bundle = root / "bundle"
    export_bundle(
        bundle,
        ckpt,
        Task.CAUSAL_LM,
        method="lora",
        trainable_layers="top:1",
        label_names=TOPICS,
        num_labels=None,
        formats=["onnx"],
        seq_len=32,
    )
    theta, theta_file = trained_theta(bundle, root, 0.5)
    export_inference(bundle, theta_file, "onnx", root / "onnx")
    export_inference(bundle, theta_file, "gguf", root / "gguf")
    return bundle, theta, root


def prompts(bundle, n: int = 4, seq: int = 20) -> dict:
    """Random right-padded prompts of different lengths."""
    rng = np.random.default_rng(3)
    ids = rng.integers(100, 49000, size=(n, seq)).astype(np.int64)
    mask = (np.arange(seq)[None, :] < rng.integers(seq // 2, seq + 1, size=(n, 1))).astype(np.int64)
    return {"input_ids": ids * mask, "attention_mask": mask}


def test_label_word_onnx_gives_the_answer_positions_label_logits(tiny_llama):
    import onnx

    from fwdllm.export.onnx_graphs import run

    bundle, theta, root = tiny_llama
    feeds = prompts(bundle)
    got = run(root / "onnx" / "model.onnx", feeds)["logits"]
    assert got.shape == (4, len(TOPICS))
    want = bundle_logits(bundle, feeds, theta)
    assert rel_err(got, want) < 1e-5
    assert rel_err(got, bundle_logits(bundle, feeds, load_theta(bundle, load_manifest(bundle)))) > 0.1
    props = {p.key: p.value for p in onnx.load(str(root / "onnx" / "model.onnx")).metadata_props}
    assert json.loads(props["id2label"])["3"] == "sports"


def test_merged_gguf_loads_in_stock_llama_cpp_and_scores_the_label_words_as_the_bundle(tiny_llama):
    import gguf
    from llama_cpp import Llama

    bundle, theta, root = tiny_llama
    manifest = load_manifest(bundle)
    path = root / "gguf" / "model.f16.gguf"
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["fwdllm.labels"].contents() == TOPICS
    assert fields["fwdllm.label_token_ids"].contents() == manifest.model.label_token_ids

    feeds = prompts(bundle)
    llm = Llama(model_path=str(path), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    rows = []
    for ids, mask in zip(feeds["input_ids"], feeds["attention_mask"]):
        llm.reset()
        llm.eval([int(t) for t in ids[mask.astype(bool)]])
        rows.append(np.asarray(llm.scores[llm.n_tokens - 1])[manifest.model.label_token_ids])
    got = np.array(rows)
    want = bundle_logits(bundle, feeds, theta)
    assert rel_err(got, want) < 1e-2  # f16 weights against fp32
    assert rel_err(got, bundle_logits(bundle, feeds, load_theta(bundle, manifest))) > 0.1
