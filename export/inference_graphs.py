"""`fwdllm export-inference`: a trained θ folded into a plain inference model, one per format.

A bundle's graphs take ``labels`` and ``theta[P, d]`` and return logits ``[P, B, C]``: what training
needs, not what a deployment loads. Here θ is written into the model first (LoRA merged into its
Linears, BitFit biases set, the head's weights set; bottleneck adapters stay as the forward hooks of
``materialize``), then the model is traced again through the stage walk the bundle's graphs are
traced from, with nothing trainable left. The result computes the bundle's logits at θ and nothing else:

- inputs ``input_ids``, ``attention_mask`` (and ``token_type_ids`` where the architecture has token types);
- output ``logits`` ``[batch, num_labels]``: the head on mean-pooled states (seq-cls), or the label
  words' logits at each prompt's last real token (causal-lm label-word bundles);
- the label names in the format's metadata (``LABELS_KEY``, GGUF: ``GGUF_LABELS``).

Every ONNX and TFLite file is run once before it counts and must match the bundle's own forward at
θ (PyTorch, θ as an input) within its format's tolerance. A merged GGUF is the whole decoder with
LoRA in its weights, for stock llama.cpp: its vocabulary-wide logits, picked at the label words.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fwdllm.errors import UserError
from fwdllm.export.models import Loaded
from fwdllm.export.perturbable import PerturbableModel, Plan, mean_pool
from fwdllm.proto.gguf_lora import GGUF_ARCHS
from fwdllm.proto.manifest import Manifest, ThetaLayout, load_manifest
from fwdllm.proto.names import GraphFormat, Precision, Task

log = logging.getLogger(__name__)

FORMATS = (GraphFormat.ONNX, GraphFormat.TFLITE, GraphFormat.GGUF)
PRECISIONS: dict[str, tuple[str, ...]] = {
    GraphFormat.ONNX: (Precision.FP32, Precision.INT8),
    GraphFormat.TFLITE: (Precision.FP32, Precision.FP16, Precision.INT8),
    GraphFormat.GGUF: (Precision.F16, Precision.Q8_0, Precision.Q4_0),
}
LABELS_KEY = "id2label"  # ONNX metadata_props key and TFLite metadata name: {"0": name, ...} as JSON
GGUF_LABELS = "fwdllm.labels"  # the label words, in label order
GGUF_LABEL_TOKENS = "fwdllm.label_token_ids"  # the token each label word starts with after the prompt
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
VALIDATION_BATCH = (2, 16)  # ONNX: B, S of the check batch; TFLite checks at its fixed shape


class InferenceModel(nn.Module):
    """``input_ids, attention_mask[, token_type_ids] -> {"logits": [B, C]}`` for a model with θ in its weights.

    Runs the bundle's stage walk (a ``PerturbableModel`` whose plan has nothing trainable), so every
    architecture-specific step, the label words' one-position last layer included, is the graphs' own.
    """

    def __init__(self, folded: nn.Module, plan: Plan, theta: np.ndarray):
        super().__init__()
        frozen = replace(plan, sites=[], layout=ThetaLayout.from_shapes([]), expand_stage=plan.num_layers + 1)
        self.pm = PerturbableModel(folded, frozen)
        self.label_words = plan.label_token_ids is not None
        self.head: nn.Module
        if self.pm.label_head is not None:
            self.head = self.pm.label_head
        else:
            t = plan.layout.split(np.asarray(theta, dtype=np.float32))
            weight = torch.from_numpy(np.array(t["classifier.weight"]))
            self.head = nn.Linear(weight.shape[1], weight.shape[0])
            with torch.no_grad():
                self.head.weight.copy_(weight)
                self.head.bias.copy_(torch.from_numpy(np.array(t["classifier.bias"])))
        self.requires_grad_(False)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        h = self.pm.spec.final(self.pm.model, self.pm.prefix(input_ids, attention_mask, token_type_ids))
        logits = self.head(h[:, 0]) if self.label_words else self.head(mean_pool(h, attention_mask))
        return {"logits": logits}


@dataclass
class Folded:
    """A bundle's model with a trained θ written into it, and what the writers need beside it."""

    manifest: Manifest
    loaded: Loaded
    plan: Plan
    theta: np.ndarray
    model: nn.Module  # the HF model with θ applied (LoRA merged)
    labels: list[str]

    @property
    def input_names(self) -> list[str]:
        types = int(getattr(self.loaded.config, "type_vocab_size", 0) or 0) > 1  # BERT, ALBERT
        return ["input_ids", "attention_mask"] + (["token_type_ids"] if types else [])

    def inference_model(self) -> InferenceModel:
        return InferenceModel(self.model, self.plan, self.theta).eval()

    def reference(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The bundle's own forward at θ (θ an input, LoRA unmerged, the head from θ): logits [B, C]."""
        pm = PerturbableModel(self.loaded.model, self.plan).eval()
        ids, mask = (torch.from_numpy(feeds[n]).long() for n in ("input_ids", "attention_mask"))
        with torch.no_grad():
            _, logits = pm.full(ids, mask, torch.zeros(len(ids), dtype=torch.long), torch.from_numpy(self.theta[None]))
        return logits[0].numpy()

    def sample(self, batch: int, seq: int) -> dict[str, np.ndarray]:
        """Random ids, the last row half padding, token types all 0 (as the bundle's graphs see them)."""
        rng = np.random.default_rng(0)
        ids = rng.integers(5, int(self.loaded.config.vocab_size), size=(batch, seq)).astype(np.int64)
        mask = np.ones_like(ids)
        if batch > 1:
            mask[-1, seq // 2 :] = 0
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        return {n: feeds[n] for n in self.input_names}


def check_request(fmt: str, precision: str | None) -> str:
    """The precision to write (the format's default when None); errors before any model is loaded."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: choose from {', '.join(FORMATS)}")
    chosen = precision or PRECISIONS[fmt][0]
    if chosen not in PRECISIONS[fmt]:
        raise UserError(f"--precision {chosen}: {fmt} takes {', '.join(PRECISIONS[fmt])}")
    return chosen


def fold(bundle: Path, theta_file: Path, fmt: str) -> Folded:
    from fwdllm.export.materialize import merged
    from fwdllm.export.models import load
    from fwdllm.export.peft_out import load_trained_theta
    from fwdllm.export.plan import plan_from_manifest

    manifest = load_manifest(bundle)
    info = manifest.model
    if info.task == Task.CAUSAL_LM and not info.label_token_ids:
        raise UserError(
            f"{bundle} is a causal-lm bundle without label words: it has no [batch, labels] logits to export; "
            "use `fwdllm export-peft` for its θ"
        )
    model_type = info.extra.get("model_type", info.architecture)
    if fmt == GraphFormat.GGUF and (model_type not in GGUF_ARCHS or manifest.peft.method != "lora"):
        raise UserError(
            f"--format gguf writes a {'/'.join(GGUF_ARCHS)} decoder with its LoRA merged; this bundle is "
            f"{model_type} {manifest.peft.method}: use --format onnx or tflite"
        )
    theta = load_trained_theta(Path(theta_file), manifest)
    loaded = load(info.source, info.task)
    plan = plan_from_manifest(loaded.model, manifest)
    labels = list(info.labels or [f"LABEL_{i}" for i in range(plan.num_labels or 0)])
    return Folded(manifest, loaded, plan, theta, merged(loaded.model, plan, theta), labels)


def export_inference(
    bundle: Path,
    theta_file: Path,
    fmt: str,
    out: Path,
    precision: str | None = None,
    batch_size: int = 1,
    seq_len: int | None = None,
) -> tuple[list[Path], float | None]:
    """Write OUT for ``fmt``; returns the files written and the checked max |logits − bundle's| (None for GGUF)."""
    precision = check_request(fmt, precision)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} already exists and is not empty; choose a new folder or delete it")
    if batch_size < 1 or (seq_len is not None and seq_len < 1):
        raise UserError("--batch-size and --seq-len must be at least 1")
    folded = fold(bundle, theta_file, fmt)
    out.mkdir(parents=True, exist_ok=True)
    try:
        if fmt == GraphFormat.GGUF:
            return [_write_gguf(folded, out, precision)], None
        for name in TOKENIZER_FILES:
            if (folded.loaded.folder / name).is_file():
                shutil.copyfile(folded.loaded.folder / name, out / name)
        if fmt == GraphFormat.ONNX:
            err = _write_onnx(folded, out, precision)
            _write_config(folded, out)
        else:
            err = _write_tflite(folded, out, precision, batch_size, seq_len or folded.manifest.model.max_seq_len)
        return sorted(out.iterdir()), err
    except BaseException:  # a model that failed its check (or half a file) is not left to be deployed
        for path in out.iterdir():
            path.unlink()
        raise


def id2label(labels: list[str]) -> str:
    return json.dumps({str(i): name for i, name in enumerate(labels)})


def _check(folded: Folded, got: np.ndarray, feeds: dict[str, np.ndarray], tolerance: float, what: str) -> float:
    """Max |got − the bundle's forward at θ|; beyond ``tolerance`` × the logits' scale nothing is kept."""
    from fwdllm.export.pipeline import ValidationError

    want = folded.reference(feeds)
    err = float(np.max(np.abs(got - want)))
    if err > tolerance * max(float(np.max(np.abs(want))), 1e-6):
        raise ValidationError(
            f"{what}: the folded graph's logits differ from the bundle's at θ by {err:.3g}, beyond the tolerance "
            f"{tolerance:g} (relative); this is an exporter bug: report it with the command line"
        )
    return err


def _write_onnx(folded: Folded, out: Path, precision: str) -> float:
    """``model.onnx`` with dynamic ``batch_size``/``sequence_length`` (Optimum's axis names)."""
    import onnx

    from fwdllm.export import onnx_graphs

    names = folded.input_names
    feeds = folded.sample(*VALIDATION_BATCH)
    axes = {n: {0: "batch_size", 1: "sequence_length"} for n in names} | {"logits": {0: "batch_size"}}
    path = out / "model.onnx"
    fp32 = path if precision == Precision.FP32 else out / ".model.fp32.onnx"
    with torch.no_grad():
        torch.onnx.export(
            folded.inference_model(),
            tuple(torch.from_numpy(feeds[n]) for n in names),
            str(fp32),
            input_names=names,
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=onnx_graphs.OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
    if fp32 != path:
        onnx_graphs.quantize_int8(fp32, path)
        fp32.unlink()
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {LABELS_KEY: id2label(folded.labels)})
    onnx.save(model, str(path))
    got = onnx_graphs.run(path, feeds)["logits"]
    return _check(folded, got, feeds, onnx_graphs.TOLERANCE[precision], f"onnx {precision}")


def _write_config(folded: Folded, out: Path) -> None:
    """config.json as Optimum's ``ORTModelForSequenceClassification`` reads it: the base config with
    ``*ForSequenceClassification``, ``id2label`` and ``label2id``."""
    cfg = copy.deepcopy(folded.loaded.config)
    stem = type(folded.loaded.model).__name__.removesuffix("ForCausalLM").removesuffix("Model")
    cfg.architectures = [f"{stem}ForSequenceClassification"]
    cfg.id2label = dict(enumerate(folded.labels))
    cfg.label2id = {name: i for i, name in enumerate(folded.labels)}
    cfg.to_json_file(str(out / "config.json"))


def _write_tflite(folded: Folded, out: Path, precision: str, batch: int, seq: int) -> float:
    """``model.tflite`` (B, S fixed, ids int32) with ``id2label`` in the model's metadata."""
    import litert_torch

    from fwdllm.export import tflite_graphs

    feeds = folded.sample(batch, seq)
    path = out / "model.tflite"
    fp32 = path if precision == Precision.FP32 else out / ".model.fp32.tflite"
    kwargs = {n: torch.from_numpy(v) for n, v in feeds.items()}
    with torch.no_grad():
        litert_torch.convert(folded.inference_model(), sample_kwargs=kwargs).export(str(fp32))
    if fp32 != path:
        tflite_graphs.quantize(fp32, path, precision)
        fp32.unlink()
    add_tflite_metadata(path, LABELS_KEY, id2label(folded.labels).encode())
    got = tflite_graphs.run(path, feeds)["logits"]
    return _check(folded, got, feeds, tflite_graphs.TOLERANCE[precision], f"tflite {precision}")


def add_tflite_metadata(path: Path, name: str, data: bytes) -> None:
    """Append a named metadata buffer (the flatbuffer's ``Model.metadata``) with LiteRT's own schema module.

    Buffers the quantizer stored after the flatbuffer (``offset``/``size``) are moved inside it first:
    repacking moves the flatbuffer's end, so their offsets would no longer point at them."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    raw = path.read_bytes()
    model = schema.ModelT.InitFromPackedBuf(bytearray(raw), 0)
    for b in model.buffers or []:
        if b.offset > 1:
            b.data, b.offset, b.size = np.frombuffer(raw, np.uint8, b.size, b.offset), 0, 0
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(data, dtype=np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = name, len(model.buffers) - 1
    model.metadata = [*(model.metadata or []), entry]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(builder.Output())


def tflite_metadata(path: Path) -> dict[str, bytes]:
    """A TFLite file's named metadata buffers."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(bytearray(Path(path).read_bytes()), 0)
    entries = (model.Metadata(i) for i in range(model.MetadataLength()))
    return {e.Name().decode(): model.Buffers(e.Buffer()).DataAsNumpy().tobytes() for e in entries}


def _write_gguf(folded: Folded, out: Path, precision: str) -> Path:
    """``model.<precision>.gguf``: the decoder with θ merged; the label words and their tokens as keys."""
    from fwdllm.export.gguf import quantize, tokenizer_source, write_f16

    tokenizer = tokenizer_source(folded.manifest.model.source, folded.loaded.tokenizer_file)
    metadata: dict[str, str | list[str] | list[int]] = {
        GGUF_LABELS: folded.labels,
        GGUF_LABEL_TOKENS: list(folded.manifest.model.label_token_ids or []),
    }
    path = out / f"model.{precision}.gguf"
    f16 = path if precision == Precision.F16 else out / ".model.f16.gguf"
    write_f16(folded.model, tokenizer, f16, metadata)
    if f16 != path:
        quantize(f16, path, precision)
        f16.unlink()
    return path
