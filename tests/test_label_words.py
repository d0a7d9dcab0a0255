"""Classification as generation for decoders: label words scored at the answer position.

Every check compares with an independent computation: the Hugging Face model's own forward
(peft LoRA applied, logits over the whole vocabulary) picked at the label words after each
prompt, and autograd's directional derivative for the forward-gradient estimate.
"""

import json

import numpy as np
import pytest
from export_helpers import rel_err, tiny_checkpoint

from fwdllm.data.datasets import load_dataset
from fwdllm.proto.names import Task

BBC_WORDS = ["business", "entertainment", "politics", "sports", "tech"]


def _hf_label_logits(model, ids, mask, word_ids):
    """Label-word logits from the HF model's full vocabulary output at each row's last real token."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits
    last = torch.as_tensor(mask).sum(1) - 1
    return out[torch.arange(len(last)), last][:, word_ids].double().numpy()


def _cross_entropy(logits, labels):
    top = logits.max(1, keepdims=True)
    logz = np.log(np.exp(logits - top).sum(1)) + top[:, 0]
    return float((logz - logits[np.arange(len(labels)), labels]).mean())


# ----- data ------------------------------------------------------------------------------------


def test_bbc_lm_poses_each_article_as_a_prompt_answered_by_its_topic_word():
    plain, words = load_dataset("bbc"), load_dataset("bbc-lm")
    assert words.task == Task.CAUSAL_LM and words.labels == plain.labels == BBC_WORDS
    assert len(words.train) == len(plain.train) and len(words.heldout) == len(plain.heldout)
    for e, p in zip(words.heldout[:50], plain.heldout[:50]):
        assert e["label"] == p["label"]
        assert e["prompt"] == "Article: " + " ".join(p["text"].split()[:24]) + "\nTopic:"


def test_label_words_partition_non_iid_like_the_classification_data(tmp_path):
    from fwdllm.data.partition import open_federated

    fed = open_federated("bbc-lm", 20, alpha=0.5, seed=0)
    assert fed.labels == BBC_WORDS and fed.info["scheme"] == "dirichlet" and fed.info["label_skew"] > 0.2


def test_export_refuses_label_words_that_share_a_first_token(tmp_path):
    from fwdllm.errors import UserError
    from fwdllm.export.models import resolve
    from fwdllm.export.pipeline import label_word_ids

    tok = resolve("smollm2")[0] / "tokenizer.json"
    ids = label_word_ids(tok, BBC_WORDS)
    assert len(set(ids)) == 5
    with pytest.raises(UserError, match="start with the same token"):
        label_word_ids(tok, ["sports", "sportsman"])


# ----- export on a tiny random llama (fast) -----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_words(tmp_path_factory):
    """A tiny random llama with LoRA on its top layer, label words from MiniLM's tokenizer, ONNX cut export."""
    from fwdllm.cli import main

    root = tmp_path_factory.mktemp("tiny-words")
    ckpt = tiny_checkpoint("llama", root / "ckpt")
    out = root / "bundle"
    assert (
        main(
            [
                "export",
                "--model",
                str(ckpt),
                "--task",
                "causal-lm",
                "--label-names",
                "yes,no,maybe",
                "--peft",
                "lora",
                "--trainable-layers",
                "top:1",
                "--format",
                "onnx",
                "--seq-len",
                "16",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return ckpt, out


def _assert_graphs_match_hf(ckpt, bundle, backend_name: str, seq: int, rows: int) -> None:
    """``rows`` random prompts of ``seq`` ids (two of them padded) at 3 random θ: the label-word logits of the
    bundle's graphs on ``backend_name``, prefix + suffix and the full graph, against the HF model's own; losses
    against their cross-entropy; P rows in one call against P calls."""
    import torch
    from transformers import AutoModelForCausalLM

    from fwdllm.device_runtime.backend import Batch, open_backend
    from fwdllm.export.materialize import materialize
    from fwdllm.export.plan import plan_from_manifest
    from fwdllm.proto.manifest import load_manifest

    manifest = load_manifest(bundle)
    rng = np.random.default_rng(3)
    ids = rng.integers(5, 30000, size=(rows, seq))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    mask[3, 2:] = 0
    labels = np.arange(rows) % 3
    thetas = (0.2 * rng.standard_normal((3, manifest.theta.dim))).astype(np.float32)
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32, attn_implementation="eager").eval()
    plan = plan_from_manifest(hf, manifest)
    want = np.stack(
        [_hf_label_logits(materialize(hf, plan, row), ids, mask, manifest.model.label_token_ids) for row in thetas]
    )
    batch = Batch.of(ids, mask, labels)
    for reuse in (True, False):  # prefix + suffix, and the full graph
        with open_backend(bundle, backend_name, options={"prefix_reuse": reuse}) as backend:
            assert backend.cut == reuse
            got = np.stack([backend.logits(batch, row) for row in thetas])
            losses = backend.losses(batch, thetas)
            one_by_one = np.array([backend.losses(batch, row[None])[0] for row in thetas])
        assert rel_err(got, want) < 1e-4
        assert losses == pytest.approx([_cross_entropy(w, labels) for w in want], rel=1e-4)
        assert losses == pytest.approx(one_by_one, rel=1e-5)  # P rows in one call = P calls


def test_label_word_graphs_match_the_hf_model_and_cut_equals_uncut(tiny_words):
    from fwdllm.proto.manifest import load_manifest

    ckpt, bundle = tiny_words
    manifest = load_manifest(bundle)
    assert manifest.model.classifies and manifest.model.labels == ["yes", "no", "maybe"]
    assert {g.role for g in manifest.graphs} == {"full", "prefix", "suffix"}
    for g in manifest.graphs:
        if g.role != "prefix":
            assert [t.name for t in g.outputs] == ["loss", "logits"] and g.validation["max_rel_err"] < 1e-4
    _assert_graphs_match_hf(ckpt, bundle, "onnxruntime", seq=11, rows=4)


@pytest.fixture(scope="module")
def tiny_words_tflite(tmp_path_factory):
    """The same tiny llama, with 4 query heads over 2 key/value heads (one key/value head does not convert), as
    TFLite graphs: B = 8, S = 16, P = 8 fixed."""
    from fwdllm.cli import main

    root = tmp_path_factory.mktemp("tiny-words-tflite")
    ckpt = tiny_checkpoint("llama", root / "ckpt", num_attention_heads=4, num_key_value_heads=2)
    argv = ["export", "--model", str(ckpt), "--task", "causal-lm", "--label-names", "yes,no,maybe", "--peft", "lora"]
    argv += ["--trainable-layers", "top:1", "--format", "tflite", "--seq-len", "16", "--out", str(root / "bundle")]
    assert main(argv) == 0
    return ckpt, root / "bundle"


def test_tflite_label_word_graphs_match_the_hf_model_and_cut_equals_uncut(tiny_words_tflite):
    from fwdllm.proto.manifest import load_manifest

    ckpt, bundle = tiny_words_tflite
    formats = {(g.role, g.format) for g in load_manifest(bundle).graphs}
    assert formats == {("full", "tflite"), ("prefix", "tflite"), ("suffix", "tflite")}
    _assert_graphs_match_hf(ckpt, bundle, "litert", seq=16, rows=5)  # 5 rows: the backend pads them to B = 8


def test_tflite_export_refuses_a_single_key_value_head_before_converting(tiny_words, tmp_path, capsys):
    from fwdllm.cli import main

    ckpt, _ = tiny_words
    argv = ["export", "--model", str(ckpt), "--task", "causal-lm", "--label-names", "yes,no,maybe", "--peft", "lora"]
    assert main([*argv, "--format", "tflite", "--out", str(tmp_path / "refused")]) == 2
    assert "single key/value head" in capsys.readouterr().err and not (tmp_path / "refused").exists()


def test_forward_gradient_on_the_suffix_matches_autograd(tiny_words):
    """Central differences through the ONNX suffix against autograd's directional derivative."""
    import torch
    from transformers import AutoModelForCausalLM

    from fwdllm.device_runtime.backend import Batch, open_backend
    from fwdllm.device_runtime.engine import forward_gradients
    from fwdllm.export.perturbable import PerturbableModel
    from fwdllm.export.plan import plan_from_manifest
    from fwdllm.proto.manifest import load_manifest
    from fwdllm.proto.perturbation import Distribution, generate

    ckpt, bundle = tiny_words
    manifest = load_manifest(bundle)
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32, attn_implementation="eager").eval()
    pm = PerturbableModel(hf, plan_from_manifest(hf, manifest))
    rng = np.random.default_rng(5)
    ids, mask = rng.integers(5, 30000, size=(4, 10)), np.ones((4, 10), dtype=np.int64)
    mask[2, 7:] = 0
    labels = np.array([1, 0, 2, 1])
    theta = (0.3 * rng.standard_normal(manifest.theta.dim)).astype(np.float32)
    t = torch.tensor(theta[None], requires_grad=True)
    loss = pm.full(torch.as_tensor(ids), torch.as_tensor(mask), torch.as_tensor(labels), t)[0][0]
    (grad,) = torch.autograd.grad(loss, t)
    seeds = [11, 12, 13, 14]
    want = [
        float(grad[0].double() @ torch.from_numpy(generate(s, 0, theta.size, Distribution.GAUSSIAN)).double())
        for s in seeds
    ]
    with open_backend(bundle, "onnxruntime") as backend:
        got = forward_gradients(backend, Batch.of(ids, mask, labels), theta, seeds, epsilon=1e-3).jvp
    assert np.allclose(got, want, rtol=2e-2, atol=2e-3 * max(abs(w) for w in want))


def test_devices_read_prompt_and_label_words_and_keep_the_end_of_long_prompts(tiny_words, tmp_path):
    from fwdllm.device_runtime.backend import open_backend
    from fwdllm.device_runtime.examples import DataError, load_examples

    _, bundle = tiny_words
    file = tmp_path / "client.jsonl"
    file.write_text(
        json.dumps({"prompt": "one two three", "label": "no"})
        + "\n"
        + json.dumps({"prompt": "four five", "target": " maybe"})
        + "\n"
        + json.dumps({"prompt": " ".join(["word"] * 40) + " end", "label": 0})
        + "\n"
    )
    with open_backend(bundle, "onnxruntime") as backend:
        examples = load_examples(file, backend.manifest)
        assert [e.label for e in examples] == [1, 2, 0]
        batch = backend.tokenizer().batch(examples)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    whole = tok.encode(examples[2].prompt).ids
    assert len(whole) > 16 and batch.attention_mask[2].sum() == 16
    assert batch.input_ids[2].tolist() == whole[-16:]  # the cue at the end survives truncation
    file.write_text(json.dumps({"prompt": "x", "label": "perhaps"}) + "\n")
    with open_backend(bundle, "onnxruntime") as backend, pytest.raises(DataError, match="unknown label 'perhaps'"):
        load_examples(file, backend.manifest)


# ----- the real SmolLM2 on real text -----------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_words(tmp_path_factory):
    """SmolLM2 + LoRA on q/v of the top 2 layers, BBC topic words, ONNX (cut) and GGUF f16."""
    from fwdllm.cli import main

    out = tmp_path_factory.mktemp("smol-words") / "bundle"
    assert (
        main(
            [
                "export",
                "--model",
                "smollm2",
                "--task",
                "causal-lm",
                "--label-names",
                ",".join(BBC_WORDS),
                "--peft",
                "lora",
                "--trainable-layers",
                "top:2",
                "--format",
                "onnx,gguf",
                "--precision",
                "fp32,f16",
                "--seq-len",
                "64",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


def test_smollm2_label_words_on_bbc_text_match_pytorch_on_every_backend(smollm2_words):
    """Loss and accuracy of real BBC prompts: ONNX Runtime (cut and uncut) and llama.cpp f16 against the
    HF model's vocabulary-wide logits picked at the label words."""
    from fwdllm.device_runtime.backend import open_backend
    from fwdllm.device_runtime.examples import Example
    from fwdllm.export.materialize import materialize
    from fwdllm.export.models import load
    from fwdllm.export.plan import plan_from_manifest
    from fwdllm.proto.manifest import load_manifest

    manifest = load_manifest(smollm2_words)
    data = load_dataset("bbc-lm")
    examples = data.heldout[:8]
    hf = load("smollm2", Task.CAUSAL_LM).model
    rng = np.random.default_rng(0)
    theta = (0.02 * rng.standard_normal(manifest.theta.dim)).astype(np.float32)  # B ≠ 0: LoRA changes the logits
    tuned = materialize(hf, plan_from_manifest(hf, manifest), theta)
    labels = np.array([BBC_WORDS.index(e["label"]) for e in examples])
    for name, options, tol in (
        ("onnxruntime", {"prefix_reuse": True}, 1e-4),
        ("onnxruntime", {"prefix_reuse": False}, 1e-4),
        ("llama.cpp", {}, 2e-2),
    ):
        with open_backend(smollm2_words, name, options=options) as backend:
            batch = backend.tokenizer().batch(
                [Example(prompt=e["prompt"], label=int(y)) for e, y in zip(examples, labels)]
            )
            want = _hf_label_logits(tuned, batch.input_ids, batch.attention_mask, manifest.model.label_token_ids)
            got = backend.logits(batch, theta)
            loss = backend.losses(batch, theta[None])[0]
        assert rel_err(got, want) < tol, name
        assert loss == pytest.approx(_cross_entropy(want, labels), rel=tol), name
        assert (got.argmax(1) == want.argmax(1)).mean() >= (1.0 if tol < 1e-3 else 0.75), name


def test_suffix_graph_holds_no_vocabulary_matrix(smollm2_words):
    """The suffix scores 5 words: it must not carry the 49,152 × 576 embedding (113 MB in fp32)."""
    from fwdllm.proto.manifest import load_manifest

    manifest = load_manifest(smollm2_words)
    suffix = manifest.graph("onnx", "suffix")
    size = (smollm2_words / suffix.file).stat().st_size
    layer = 576 * (2 * 576 + 2 * 192 + 3 * 1536)  # q, o; k, v (3 of 9 heads); gate, up, down
    assert size < 1.1 * 4 * 2 * layer  # two layers' weights in fp32, +10%


def test_a_short_federated_run_of_real_processes_lifts_smollm2_over_zero_shot(smollm2_words, tmp_path):
    """`fwdllm simulate` (a real coordinator and device processes over loopback gRPC) on BBC topics as
    label words: held-out accuracy after 30 steps is above the zero-shot accuracy of the same θ0."""
    from dataclasses import replace

    from fwdllm.data.partition import federate, write_partition
    from fwdllm.simulate import SimConfig, simulate

    data = load_dataset("bbc-lm")
    small = replace(
        data, train=data.train[:160], heldout=data.heldout[:150]
    )  # each device's prefix runs once per example
    write_partition(federate(small, 10, alpha=None, seed=0), tmp_path / "parts")
    cfg = SimConfig(
        bundle=str(smollm2_words),
        data=str(tmp_path / "parts"),
        clients=10,
        per_step=5,
        steps=30,
        workers=2,
        perturbations=4,
        batch_size=8,
        epsilon=1e-3,
        optimizer="adam",
        lr=1e-2,
        alpha=None,
        eval_every=30,
    )
    summary = simulate(cfg, tmp_path / "run", progress=False)
    assert summary["steps"] == 30
    assert summary["after"]["accuracy"] > summary["before"]["accuracy"] + 0.04, summary
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]


def test_a_trained_theta_exports_as_an_adapter_that_stock_llama_cpp_applies(smollm2_words, tmp_path):
    """`export-peft --format gguf`: llama-cpp-python's own Llama(lora_path=...) on the bundle's base GGUF scores the
    label words as the bundle's ONNX graph does with the same θ."""
    from llama_cpp import Llama

    from fwdllm.cli import main
    from fwdllm.device_runtime.backend import open_backend
    from fwdllm.device_runtime.examples import Example
    from fwdllm.proto.manifest import load_manifest, load_theta, save_theta

    manifest = load_manifest(smollm2_words)
    # large enough that LoRA moves the label logits well beyond f16 rounding (B·A is quadratic in the scale)
    theta = (0.1 * np.random.default_rng(1).standard_normal(manifest.theta.dim)).astype(np.float32)
    save_theta(tmp_path / "trained.safetensors", manifest.theta, theta)
    out = tmp_path / "adapter"
    argv = ["export-peft", str(smollm2_words), "--theta", str(tmp_path / "trained.safetensors"), "--out", str(out)]
    assert main([*argv, "--format", "gguf"]) == 0
    assert json.loads((out / "fwdllm_labels.json").read_text())["token_ids"] == manifest.model.label_token_ids

    examples = load_dataset("bbc-lm").heldout[:6]
    with open_backend(smollm2_words, "onnxruntime") as backend:
        batch = backend.tokenizer().batch([Example(prompt=e["prompt"], label=0) for e in examples])
        want = backend.logits(batch, theta)
        base_want = backend.logits(batch, load_theta(smollm2_words, manifest))  # B = 0: the base model
    base = str(smollm2_words / manifest.graph("gguf", "base", "f16").file)
    adapted = Llama(
        model_path=base, lora_path=str(out / "adapter.gguf"), n_ctx=128, n_threads=2, logits_all=True, verbose=False
    )
    got = _llama_label_logits(adapted, batch, manifest.model.label_token_ids)
    assert rel_err(got, want) < 2e-2  # f16 weights against fp32, as the backends' own check
    assert (got.argmax(1) == want.argmax(1)).mean() >= 5 / 6
    plain = Llama(model_path=base, n_ctx=128, n_threads=2, logits_all=True, verbose=False)
    effect = got - _llama_label_logits(plain, batch, manifest.model.label_token_ids)
    assert rel_err(effect, want - base_want) < 0.1  # what the adapter changes is what θ changes in the bundle


def _llama_label_logits(llm, batch, word_ids) -> np.ndarray:
    """The label words' logits after each prompt, from llama-cpp-python's high-level API."""
    rows = []
    for ids, mask in zip(batch.input_ids, batch.attention_mask):
        llm.reset()
        llm.eval([int(t) for t in ids[mask.astype(bool)]])
        rows.append(np.asarray(llm.scores[llm.n_tokens - 1])[word_ids])
    return np.array(rows)
