"""`fwdllm export-inference`: θ folded into plain inference models, run by the stock runtimes.

Each folded model is compared with the bundle's own training graph (ONNX ``full``, θ fed as its
input, LoRA unmerged) evaluated at the same θ, and with that graph at the bundle's θ0, so a model
that ignored θ would fail. Label names are read back with each format's own reader.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from export_helpers import export_bundle, rel_err, tiny_llama_checkpoint

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


def without_lora(bundle, theta: np.ndarray) -> np.ndarray:
    """θ with its LoRA tensors zeroed and the head kept: what a fold that dropped LoRA would compute."""
    kept = theta.copy()
    for slot in load_manifest(bundle).theta.tensors:
        if not slot.name.startswith("classifier."):
            kept[slot.offset : slot.offset + slot.size] = 0
    return kept


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
    assert rel_err(got, bundle_logits(bundle, feeds, without_lora(bundle, theta))) > 0.1  # LoRA is in the weights

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
    assert rel_err(got, bundle_logits(bundle, feeds, without_lora(bundle, theta))) > 0.1
    labels = json.loads(tflite_metadata(root / "tflite" / "model.tflite")["id2label"])
    assert labels == {str(i): t for i, t in enumerate(TOPICS)}


def test_tflite_metadata_survives_weights_the_quantizer_stores_outside_the_flatbuffer(minilm, tmp_path):
    """ai-edge-quantizer writes int8 weights after the flatbuffer (offset/size); adding metadata repacks it."""
    from ai_edge_litert import schema_py_generated as schema

    from fwdllm.export import tflite_graphs
    from fwdllm.export.inference_graphs import add_tflite_metadata, tflite_metadata

    bundle, theta, root = minilm
    path = tmp_path / "int8.tflite"
    tflite_graphs.quantize(root / "tflite" / "model.tflite", path, "int8")
    buffers = schema.ModelT.InitFromPackedBuf(bytearray(path.read_bytes()), 0).buffers
    assert any(b.offset > 1 for b in buffers)  # the case this test is about
    add_tflite_metadata(path, "id2label", b'{"0": "a"}')
    assert tflite_metadata(path)["id2label"] == b'{"0": "a"}'
    feeds = tokenize(root / "tflite", TEXTS, 24)
    got = tflite_graphs.run(path, feeds)["logits"]
    assert rel_err(got, bundle_logits(bundle, feeds, theta)) < tflite_graphs.TOLERANCE["int8"]


def test_export_inference_refuses_what_it_cannot_write(minilm, tmp_path, capsys):
    bundle, _, root = minilm
    argv = ["export-inference", str(bundle), "--theta", str(root / "trained.safetensors")]
    assert main([*argv, "--format", "onnx", "--precision", "q8_0", "--out", str(tmp_path / "a")]) == 2
    assert "onnx takes fp32, int8" in capsys.readouterr().err
    assert main([*argv, "--format", "gguf", "--out", str(tmp_path / "b")]) == 2
    assert "bert lora: use --format onnx or tflite" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ----- a tiny llama answering with label words ------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A tiny random llama with SmolLM2's byte-level BPE vocabulary (so it has a GGUF), LoRA on its top
    layer, BBC topic words, an ONNX bundle, a trained θ, and its folded ONNX and merged f16 GGUF."""

    root = tmp_path_factory.mktemp("tiny-llama-inference")
    ckpt = root / "ckpt"
    tiny_llama_checkpoint(ckpt)
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


def test_a_model_that_fails_its_check_is_not_left_behind(tiny_llama, tmp_path, monkeypatch, capsys):
    from fwdllm.export import onnx_graphs

    bundle, _, root = tiny_llama
    monkeypatch.setitem(onnx_graphs.TOLERANCE, "fp32", -1.0)  # every difference, even 0, is beyond it
    export_argv = ["export-inference", str(bundle), "--theta", str(root / "trained.safetensors"), "--format", "onnx"]
    assert main([*export_argv, "--out", str(tmp_path / "out")]) == 2
    assert "differ from the bundle's at θ" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []


def llama_label_logits(path, feeds: dict, word_ids: list[int]) -> np.ndarray:
    """Stock llama-cpp-python on a GGUF: the label words' logits after each prompt's last real token."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=128, n_threads=2, logits_all=True, verbose=False)
    rows = []
    for ids, mask in zip(feeds["input_ids"], feeds["attention_mask"]):
        llm.reset()
        llm.eval([int(t) for t in ids[mask.astype(bool)]])
        rows.append(np.asarray(llm.scores[llm.n_tokens - 1])[word_ids])
    return np.array(rows)


def test_merged_gguf_loads_in_stock_llama_cpp_and_scores_the_label_words_as_the_bundle(tiny_llama):
    import gguf

    bundle, theta, root = tiny_llama
    manifest = load_manifest(bundle)
    path = root / "gguf" / "model.f16.gguf"
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["fwdllm.labels"].contents() == TOPICS
    assert fields["fwdllm.label_token_ids"].contents() == manifest.model.label_token_ids

    feeds = prompts(bundle)
    got = llama_label_logits(path, feeds, manifest.model.label_token_ids)
    want = bundle_logits(bundle, feeds, theta)
    assert rel_err(got, want) < 1e-2  # f16 weights against fp32
    assert rel_err(got, bundle_logits(bundle, feeds, load_theta(bundle, manifest))) > 0.1


# ----- SmolLM2 on BBC prompts (slow: the 135M model is traced and written three times) -----------


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2 + LoRA on the top 2 layers, BBC topic words (ONNX bundle), a trained θ, BBC prompts."""
    from fwdllm.data.datasets import load_dataset
    from fwdllm.device_runtime.backend import open_backend
    from fwdllm.device_runtime.examples import Example

    root = tmp_path_factory.mktemp("smollm2-inference")
    bundle = root / "bundle"
    export_bundle(
        bundle,
        "smollm2",
        Task.CAUSAL_LM,
        method="lora",
        trainable_layers="top:2",
        label_names=TOPICS,
        num_labels=None,
        formats=["onnx"],
        seq_len=64,
    )
    theta, theta_file = trained_theta(bundle, root, 0.2, seed=1)  # B·A moves the label logits by ~2
    with open_backend(bundle, "onnxruntime") as backend:
        batch = backend.tokenizer().batch(
            [Example(prompt=e["prompt"], label=0) for e in load_dataset("bbc-lm").heldout[:6]]
        )
    feeds = {"input_ids": batch.input_ids.astype(np.int64), "attention_mask": batch.attention_mask.astype(np.int64)}
    return bundle, theta, theta_file, feeds, root


@pytest.mark.slow
def test_smollm2_folded_onnx_and_merged_gguf_score_bbc_prompts_as_the_bundle(smollm2):
    from fwdllm.export.onnx_graphs import run

    bundle, theta, theta_file, feeds, root = smollm2
    manifest = load_manifest(bundle)
    want = bundle_logits(bundle, feeds, theta)
    base = bundle_logits(bundle, feeds, load_theta(bundle, manifest))
    assert rel_err(want, base) > 0.1  # this θ moves the label logits

    export_inference(bundle, theta_file, "onnx", root / "onnx")
    got = run(root / "onnx" / "model.onnx", feeds)["logits"]
    assert rel_err(got, want) < 1e-5

    # f16 is the exactness check; q8_0 moves SmolLM2's label logits by up to ~1 (export/BUNDLE.md)
    for precision, tol in (("f16", 1e-2), ("q8_0", 0.15)):
        export_inference(bundle, theta_file, "gguf", root / precision, "--precision", precision)
        got = llama_label_logits(root / precision / f"model.{precision}.gguf", feeds, manifest.model.label_token_ids)
        assert rel_err(got, want) < tol, precision
        assert (got.argmax(1) == want.argmax(1)).mean() >= 5 / 6, precision


@pytest.mark.slow
def test_smollm2_folded_tflite_scores_bbc_prompts_as_the_bundle(smollm2):
    """The 135M decoder through litert-torch (about 7 minutes on 2 shared cores), one prompt per call."""
    from ai_edge_litert.interpreter import Interpreter

    from fwdllm.export.inference_graphs import tflite_metadata

    bundle, theta, theta_file, feeds, root = smollm2
    export_inference(bundle, theta_file, "tflite", root / "tflite", "--seq-len", "64")
    path = root / "tflite" / "model.tflite"
    runner = Interpreter(model_path=str(path)).get_signature_runner()
    padded = {k: np.pad(v, ((0, 0), (0, 64 - v.shape[1]))).astype(np.int32) for k, v in feeds.items()}
    got = np.concatenate(
        [runner(**{k: v[i : i + 1] for k, v in padded.items()})["logits"] for i in range(len(feeds["input_ids"]))]
    )
    assert rel_err(got, bundle_logits(bundle, feeds, theta)) < 1e-4
    assert json.loads(tflite_metadata(path)["id2label"])["4"] == "tech"
