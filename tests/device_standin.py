"""A small real bundle for device-runtime tests, written by `fwdllm export` itself.

A tiny random BERT (3 layers, hidden 32, MiniLM's tokenizer) with BitFit on the top layer,
so the export is cut after layer 2: full, prefix and suffix graphs, to ONNX (dynamic B, S,
P) and TFLite (fixed B=4, S=16, P=4). ``Reference.loss`` is the exporter's PyTorch model of
the same graphs (θ as an explicit tensor), which the tests differentiate with autograd.
"""

from __future__ import annotations

import atexit
import copy
import functools
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from export_helpers import export_bundle, tiny_checkpoint

from fwdllm.proto.manifest import load_manifest, load_theta
from fwdllm.proto.names import Task

LABELS = ["business", "sport", "tech"]
SEQ, TFLITE_B, TFLITE_P = 16, 4, 4


class Reference:
    """The bundle's loss as a differentiable PyTorch function of θ (the exporter's PerturbableModel)."""

    def __init__(self, checkpoint: Path, manifest):
        from fwdllm.export.models import load
        from fwdllm.export.perturbable import PerturbableModel
        from fwdllm.export.plan import PeftOptions, build_plan

        loaded = load(str(checkpoint), Task.SEQ_CLS)
        plan = build_plan(
            loaded.model,
            Task.SEQ_CLS,
            len(LABELS),
            PeftOptions(method=manifest.peft.method, trainable_layers=manifest.peft.trainable_layers),
        )
        assert plan.layout == manifest.theta
        self.pm = PerturbableModel(loaded.model, plan).eval()

    def double(self) -> Reference:
        """A float64 copy (for autograd references without float32 rounding)."""
        twin = copy.copy(self)
        twin.pm = copy.deepcopy(self.pm).double()
        return twin

    def loss(self, input_ids, attention_mask, labels, theta):
        """(loss[P], logits[P, B, C]) at each θ row."""
        return self.pm.full(input_ids, attention_mask, labels, theta)


def build_bundle(out: Path) -> tuple[Path, Reference]:
    """Export the tiny checkpoint into ``out``; return the bundle folder and its PyTorch reference."""
    out = Path(out)
    checkpoint = tiny_checkpoint("bert", out / "checkpoint")
    bundle = out / "bundle"
    export_bundle(
        bundle,
        checkpoint,
        method="bitfit",
        trainable_layers="top:1",
        formats=["onnx", "tflite"],
        precisions=["fp32"],
        seq_len=SEQ,
        batch_size=TFLITE_B,
        perturbations=TFLITE_P,
        label_names=LABELS,
        num_labels=len(LABELS),
    )
    return bundle, Reference(checkpoint, load_manifest(bundle))


def _cache_key() -> str:
    """Changes whenever the exporter, the manifest schema or this recipe changes (then the bundle is rebuilt)."""
    import hashlib
    from importlib.metadata import version

    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(" ".join(version(p) for p in ("torch", "onnx", "litert-torch", "transformers")).encode())
    for f in sorted(
        [*root.glob("export/*.py"), root / "proto/manifest.py", Path(__file__), root / "tests/export_helpers.py"]
    ):
        digest.update(f.name.encode() + f.read_bytes())
    return digest.hexdigest()[:16]


@functools.cache
def shared_bundle() -> tuple[Path, Reference]:
    """The test bundle, exported once per exporter version (about a minute) and kept in the fwdllm cache.

    Test processes that find it reuse it; a changed exporter gets a new key and a fresh export.
    """
    import os

    cache = Path(os.environ.get("FWDLLM_CACHE", Path.home() / ".cache" / "fwdllm")) / "test-bundles"
    final = cache / _cache_key()
    if not (final / "bundle" / "manifest.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="building-", dir=cache))
        atexit.register(shutil.rmtree, work, True)
        build_bundle(work)
        try:
            work.rename(final)
        except OSError:  # another test process finished first; use its copy
            pass
    return final / "bundle", Reference(final / "checkpoint", load_manifest(final / "bundle"))


@functools.cache
def shared_backend(name: str, prefix_reuse: bool = True):
    """One opened backend per (name, prefix_reuse) for the process, single-threaded."""
    from fwdllm.device_runtime.backend import open_backend

    return open_backend(shared_bundle()[0], name, options={"prefix_reuse": prefix_reuse, "threads": 1})


@functools.cache
def theta_dim() -> int:
    return load_manifest(shared_bundle()[0]).theta.dim


def initial_theta(seed: int = 1) -> np.ndarray:
    """The bundle's θ0 plus seeded noise, so every test point has non-trivial losses and gradients."""
    bundle = shared_bundle()[0]
    theta0 = load_theta(bundle, load_manifest(bundle))
    return (theta0 + 0.2 * np.random.default_rng(seed).standard_normal(theta0.size)).astype(np.float32)


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
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
