"""Backends against PyTorch on the same weights: losses, logits, P batching, prefix reuse, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from device_standin import LABELS, TEXTS, initial_theta, shared_backend, shared_bundle, write_jsonl

from fwdllm.device_runtime.backend import BACKENDS as REGISTRY
from fwdllm.device_runtime.backend import DEFAULT_BACKEND, Backend, BackendError, open_backend
from fwdllm.device_runtime.examples import DataError, Example, load_examples, select
from fwdllm.proto.manifest import BundleError, TensorSpec, ThetaLayout, load_manifest
from fwdllm.proto.names import GraphFormat

BACKENDS = ["onnxruntime", "litert"]
# ai_edge_litert's Delegate.__del__ raises AttributeError after a failed load_delegate (a known, harmless bug).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture
def standin():
    return shared_bundle()


@pytest.fixture
def opened():
    return shared_backend


def examples():
    return [Example(text=t, label=LABELS.index(lab)) for t, lab in TEXTS]


def torch_losses(model, batch, thetas):
    with torch.no_grad():
        loss, logits = model.loss(
            torch.tensor(batch.input_ids),
            torch.tensor(batch.attention_mask),
            torch.tensor(batch.labels),
            torch.tensor(thetas),
        )
    return loss.numpy(), logits.numpy()


def thetas(n):
    return np.stack([initial_theta(seed) for seed in range(n)])


@pytest.mark.parametrize("reuse", [True, False])
@pytest.mark.parametrize("name", BACKENDS)
def test_losses_and_logits_match_pytorch(opened, standin, name, reuse):
    backend = opened(name, reuse)
    batch = backend.tokenizer().batch(examples())  # 7 rows: TFLite (B=4) splits and pads them
    th = thetas(6)  # TFLite (P=4) needs two calls, the second padded
    want_loss, want_logits = torch_losses(standin[1], batch, th)
    np.testing.assert_allclose(backend.losses(batch, th), want_loss, rtol=0, atol=2e-6)
    np.testing.assert_allclose(backend.logits(batch, th[2]), want_logits[2], rtol=0, atol=2e-6)


@pytest.mark.parametrize("name", BACKENDS)
def test_p_batched_equals_single(standin, name):
    backend = open_backend(standin[0], name, options={"prefix_reuse": False, "rows_per_call": 8})
    batch = backend.tokenizer().batch(examples()[:4])
    th = thetas(8)
    batched = backend.losses(batch, th)
    single = np.array([backend.losses(batch, row[None])[0] for row in th])
    np.testing.assert_allclose(batched, single, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", BACKENDS)
def test_prefix_reuse_equals_full_and_runs_prefix_once(opened, name):
    cut, full = opened(name, True), opened(name, False)
    assert cut.info()["prefix_reuse"] and not full.info()["prefix_reuse"]
    batch = cut.tokenizer().batch(examples()[:4])
    th = thetas(8)
    cut.clear_cache()
    before = cut.prefix_runs
    np.testing.assert_allclose(cut.losses(batch, th), full.losses(batch, th), rtol=0, atol=1e-6)
    cut.losses(batch, th[:3])
    assert cut.prefix_runs - before == 1  # later perturbations of the same batch reuse the prefix


def test_litert_reports_xnnpack_delegation_and_reference_kernels_agree(standin, opened):
    xnn = opened("litert", False).info()
    assert xnn["delegates"] == ["XNNPACK"] and 0.3 < xnn["delegated_share"] <= 1.0
    ref = open_backend(standin[0], "litert", options={"kernels": "reference", "prefix_reuse": False})
    assert ref.info()["delegated_share"] == 0.0
    batch = ref.tokenizer().batch(examples()[:4])
    np.testing.assert_allclose(
        ref.losses(batch, thetas(4)), opened("litert", False).losses(batch, thetas(4)), rtol=0, atol=2e-6
    )


def test_litert_missing_external_delegate_falls_back_to_cpu(standin, caplog):
    backend = open_backend(standin[0], "litert", options={"delegates": [{"path": "libnot_a_delegate.so"}]})
    assert backend.info()["failed_delegates"][0]["path"] == "libnot_a_delegate.so"
    assert "running on the CPU instead" in caplog.text
    batch = backend.tokenizer().batch(examples()[:2])
    assert np.isfinite(backend.losses(batch, thetas(1))).all()


def test_onnx_unknown_provider_is_a_clear_error_and_missing_one_falls_back(standin):
    with pytest.raises(BackendError, match="unknown onnxruntime provider"):
        open_backend(standin[0], "onnxruntime", options={"providers": ["warp-drive"]})
    backend = open_backend(standin[0], "onnxruntime", options={"providers": ["qnn", "cpu"]})
    assert backend.info()["providers"][-1] == "CPUExecutionProvider"


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("name,file", [("onnxruntime", "full.onnx"), ("litert", "full.tflite")])
def test_truncated_graph_is_a_clear_error(standin, tmp_path, name, file):
    bundle = tmp_path / "b"
    shutil.copytree(standin[0], bundle)
    data = (bundle / file).read_bytes()
    (bundle / file).write_bytes(data[: len(data) // 3])
    with pytest.raises(BundleError, match="corrupt or truncated"):
        open_backend(bundle, name, options={"prefix_reuse": False})
    manifest = load_manifest(bundle, verify_checksums=False)  # a runtime that skips checksums still refuses it
    with pytest.raises(BackendError, match="corrupt, truncated"):
        open_backend(bundle, name, options={"prefix_reuse": False}, manifest=manifest)


@pytest.mark.parametrize("name", BACKENDS)
def test_manifest_that_does_not_match_the_graph(standin, name):
    manifest = load_manifest(standin[0])
    manifest.theta = ThetaLayout.from_shapes([("head.weight", (5, 16))])
    with pytest.raises(BackendError, match="does not match the graph"):
        open_backend(standin[0], name, options={"prefix_reuse": False}, manifest=manifest)
    manifest = load_manifest(standin[0])
    for g in manifest.graphs:
        g.inputs.append(TensorSpec("token_type_ids", g.inputs[0].shape, g.inputs[0].dtype))
    with pytest.raises(BackendError, match="does not match"):
        open_backend(standin[0], name, options={"prefix_reuse": False}, manifest=manifest)


@pytest.mark.parametrize("name", BACKENDS)
def test_theta_of_wrong_length(opened, name):
    backend = opened(name, False)
    batch = backend.tokenizer().batch(examples()[:2])
    d = backend.theta_dim
    with pytest.raises(BackendError, match=rf"θ must have shape \[P, {d}\]"):
        backend.losses(batch, np.zeros((2, d - 1), np.float32))


def test_local_data_loader(standin, tmp_path):
    manifest = load_manifest(standin[0])
    rows = [{"text": t, "label": lab} for t, lab in TEXTS[:3]] + [{"text": "index labels work", "label": 2}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    with open(path, "a") as fh:
        fh.write("\n")  # blank lines are tolerated
    got = load_examples(path, manifest)
    assert [e.label for e in got] == [0, 1, 2, 2]
    assert [e.text for e in select(got, 3, 3)] == ["index labels work", TEXTS[0][0], TEXTS[1][0]]


@pytest.mark.parametrize(
    "row,message",
    [
        ({"text": "x", "label": "weather"}, "unknown label 'weather'"),
        ({"text": "x", "label": 7}, "unknown label 7"),
        ({"text": "   ", "label": "tech"}, 'empty or missing "text"'),
        ({"label": "tech"}, 'empty or missing "text"'),
    ],
)
def test_bad_local_data_is_a_clear_error(standin, tmp_path, row, message):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "fine", "label": "tech"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=f"line 2: {message}"):
        load_examples(path, load_manifest(standin[0]))


def test_unparseable_and_missing_data_files(standin, tmp_path):
    manifest = load_manifest(standin[0])
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match="line 1"):
        load_examples(tmp_path / "bad.jsonl", manifest)
    with pytest.raises(DataError, match="fwdllm data partition"):
        load_examples(tmp_path / "absent.jsonl", manifest)


def test_tokenizer_pads_truncates_and_keeps_sep(opened):
    tok = opened("onnxruntime", False).tokenizer()
    batch = tok.batch([Example(text="word " * 50, label=0), Example(text="short", label=1)])
    assert batch.input_ids.shape == (2, 16)
    assert batch.input_ids[0, 0] == 101 and batch.input_ids[0, -1] == 102  # [CLS] ... [SEP]
    assert batch.attention_mask[1].sum() == 3 and batch.input_ids[1, 3:].tolist() == [0] * 13


def test_backends_register_themselves_with_what_callers_ask_of_them():
    declared = {name: (cls.graph_format, cls.theta_role, cls.next_token_logits) for name, cls in REGISTRY.items()}
    assert declared == {
        "onnxruntime": ("onnx", "full", False),
        "litert": ("tflite", "full", False),
        "llama.cpp": ("gguf", "base", True),
    }
    assert DEFAULT_BACKEND in REGISTRY and "tpu" not in REGISTRY and REGISTRY.get("tpu") is None
    with pytest.raises(BackendError, match=r"unknown backend 'tpu'; choose one of \['onnxruntime', 'litert'"):
        REGISTRY["tpu"]


def test_a_backend_defined_elsewhere_is_a_command_line_choice(monkeypatch):
    import argparse

    from fwdllm.device_runtime import backend as backend_module
    from fwdllm.device_runtime.cli import _backend_args

    monkeypatch.setattr(backend_module, "_REGISTERED", dict(backend_module._REGISTERED))

    class EchoBackend(Backend):
        name = "echo"
        graph_format = GraphFormat.ONNX

        @classmethod
        def runtime_info(cls):
            return {}

        def losses(self, batch, thetas):
            return np.zeros(len(thetas), np.float32)

        def logits(self, batch, theta):
            return np.zeros((batch.size, 2), np.float32)

        def info(self):
            return {}

    parser = argparse.ArgumentParser()
    _backend_args(parser)
    assert parser.parse_args(["--backend", "echo"]).backend == "echo" and REGISTRY["echo"] is EchoBackend
