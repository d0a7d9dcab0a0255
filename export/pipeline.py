"""`fwdllm export`: checkpoint + PEFT choice -> a validated bundle, written beside --out and renamed at the end."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fwdllm import __version__
from fwdllm.errors import UserError
from fwdllm.export.graphs import errors, sample_batch
from fwdllm.export.models import Loaded
from fwdllm.export.perturbable import PerturbableModel, Plan
from fwdllm.export.plan import PeftOptions, adapter_labels, build_plan
from fwdllm.proto.manifest import THETA_FILE, Manifest, ModelInfo, PeftInfo, save_theta, write_manifest
from fwdllm.proto.names import GraphFormat, GraphRole, Precision, Task

log = logging.getLogger(__name__)

# Tables keyed by StrEnum members are looked up by plain names too (a member hashes as its value).
DEFAULT_PRECISIONS: dict[str, list[str]] = {
    GraphFormat.ONNX: [Precision.FP32],
    GraphFormat.TFLITE: [Precision.FP32, Precision.INT8],
    GraphFormat.GGUF: [Precision.F16, Precision.Q8_0, Precision.Q4_0],
}
VALIDATION_ROWS = 3  # θ rows (P) in the validation batch


class ValidationError(UserError):
    """An exported graph disagrees with PyTorch beyond its tolerance; no bundle is written."""


@dataclass
class ExportRequest:
    model: str
    task: str
    out: Path
    formats: list[str] = field(default_factory=lambda: [GraphFormat.ONNX])
    precisions: list[str] | None = None
    num_labels: int | None = None
    label_names: list[str] | None = None
    peft: PeftOptions = field(default_factory=PeftOptions)
    seq_len: int = 64
    batch_size: int = 8
    perturbations: int = 8
    validation_seq_len: int = 16


@dataclass
class ExportContext:
    """What a format exporter needs: the traced model, samples, the reference and a validator."""

    dir: Path
    req: ExportRequest
    loaded: Loaded
    plan: Plan
    pm: PerturbableModel
    cut: bool
    hidden_size: int
    sample: dict = field(default_factory=dict)  # validation batch (P = VALIDATION_ROWS)
    want: dict = field(default_factory=dict)  # reference outputs for `sample`
    trace_sample: dict = field(default_factory=dict)
    trace_hidden: np.ndarray | None = None
    timings: dict = field(default_factory=dict)

    @contextlib.contextmanager
    def step(self, name: str):
        t0 = time.perf_counter()
        log.info("%s ...", name)
        yield
        self.timings[name] = round(time.perf_counter() - t0, 3)

    def batch(self, batch: int, seq: int, rows: int, seed: int) -> tuple[dict, dict]:
        """A random batch of fixed shape with P = ``rows`` θ rows, its reference outputs, and the prefix's hidden
        states."""
        from fwdllm.export.materialize import reference

        sample = sample_batch(
            self.plan, int(self.loaded.config.vocab_size), batch, seq, rows, self.plan.theta0().numpy(), seed
        )
        loss, logits = reference(
            self.loaded.model,
            self.plan,
            sample["theta"],
            sample["input_ids"],
            sample["attention_mask"],
            sample["labels"],
        )
        if self.cut:
            with torch.no_grad():
                sample["hidden"] = self.pm.prefix(
                    torch.from_numpy(sample["input_ids"]), torch.from_numpy(sample["attention_mask"])
                ).numpy()
        return sample, {"loss": loss, "logits": logits}

    def validate(
        self,
        run: Callable[[str, dict], dict],
        roles: list[str],
        tol: float,
        what: str,
        sample: dict | None = None,
        want: dict | None = None,
    ) -> dict[str, dict]:
        """Run the graphs on a validation batch (default: the P=3 one); compare full (and prefix->suffix) with PyTorch.

        Raises ValidationError beyond ``tol`` (scale-relative, graphs.errors).
        """
        if sample is None or want is None:
            sample, want = self.sample, self.want
        full = run(GraphRole.FULL, sample)
        err = errors(full, want)
        reference = "transformers+peft (PyTorch)"
        result: dict[str, dict] = {
            GraphRole.FULL: dict(err, tolerance=tol, theta_rows=VALIDATION_ROWS, reference=reference)
        }
        if GraphRole.PREFIX in roles:
            hidden = run(GraphRole.PREFIX, sample)["hidden"]
            split = run(GraphRole.SUFFIX, dict(sample, hidden=hidden))
            serr = errors(split, want)
            vs_full = errors(split, {k: v for k, v in full.items()})
            serr["max_rel_err_vs_full"] = vs_full["max_rel_err"]
            result[GraphRole.SUFFIX] = dict(
                serr, tolerance=tol, theta_rows=VALIDATION_ROWS, reference="prefix then suffix vs PyTorch"
            )
            result[GraphRole.PREFIX] = {"checked_through": GraphRole.SUFFIX}
            err = {"max_rel_err": max(err["max_rel_err"], serr["max_rel_err"])}
        if not err["max_rel_err"] <= tol:
            raise ValidationError(
                f"{what}: the exported graph differs from PyTorch by {err['max_rel_err']:.3g} (relative), "
                f"beyond the tolerance {tol:g}; the bundle was not written. This is an exporter bug for "
                f"{self.plan.spec.name}/{self.req.peft.method}: report it with the command line"
            )
        return result


FORMAT_MODULES: dict[str, str] = {
    GraphFormat.ONNX: "fwdllm.export.onnx_graphs",
    GraphFormat.TFLITE: "fwdllm.export.tflite_graphs",
    GraphFormat.GGUF: "fwdllm.export.gguf_bridge",
}


def _exporters(formats: list[str]):
    """Each requested format's module (PRECISIONS, export_all), imported only when asked for."""
    import importlib

    return {f: importlib.import_module(FORMAT_MODULES[f]) for f in formats}


def _precisions_for(fmt: str, supported: tuple[str, ...], requested: list[str] | None) -> list[str]:
    if requested is None:
        return DEFAULT_PRECISIONS[fmt]
    chosen = [p for p in requested if p in supported]
    if not chosen:
        takes = [str(p) for p in supported]
        raise UserError(f"--precision {','.join(requested)} has nothing {fmt} supports; {fmt} takes {takes}")
    return chosen


def check_request(req: ExportRequest) -> None:
    unknown = [f for f in req.formats if f not in tuple(GraphFormat)]
    if unknown or not req.formats:
        raise UserError(f"--format {','.join(req.formats)}: choose from {[str(f) for f in GraphFormat]}")
    if req.task not in tuple(Task):
        raise UserError(f"--task {req.task!r}: choose {' or '.join(Task)}")
    if GraphFormat.GGUF in req.formats and req.task != Task.CAUSAL_LM:
        raise UserError(
            "--format gguf is for llama decoders (--task causal-lm); export encoders with --format onnx,tflite"
        )
    for name in ("seq_len", "batch_size", "perturbations"):
        if getattr(req, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if req.task == Task.SEQ_CLS and req.peft.from_peft_adapter and req.num_labels is None and req.label_names is None:
        names = adapter_labels(req.peft.from_peft_adapter)
        if names and names != [f"LABEL_{i}" for i in range(len(names))]:
            req.label_names = names
        elif names:
            req.num_labels = len(names)
    if req.label_names is not None:
        if req.num_labels is not None and req.num_labels != len(req.label_names):
            raise UserError(
                f"--labels {req.num_labels} disagrees with the {len(req.label_names)} --label-names; give one of them"
            )
        req.num_labels = len(req.label_names)
    if req.task == Task.SEQ_CLS and (req.num_labels is None or req.num_labels < 2):
        raise UserError(
            f"a classifier needs at least 2 labels, got {req.num_labels}; pass --labels N (N >= 2) or --label-names a,b"
        )
    if req.task == Task.CAUSAL_LM and req.num_labels is not None:
        if req.label_names is None:
            raise UserError(
                "--task causal-lm answers with label words: name them with --label-names a,b (not --labels N)"
            )
        if req.num_labels < 2:
            raise UserError(f"label-word classification needs at least 2 --label-names, got {req.label_names}")
    out = Path(req.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not empty; choose a new folder or delete it")


def _head_description(task: str, word_ids: list[int] | None) -> str:
    if task == Task.SEQ_CLS:
        return "Linear(hidden, labels) on mean-pooled last hidden states"
    if word_ids:
        return "lm_head rows of the label words, at the prompt's last token (frozen)"
    return "lm_head (frozen)"


def label_word_ids(tokenizer_file: Path, names: list[str]) -> list[int]:
    """The token id each label word starts with as it follows a prompt (a space, then the word).

    The graphs score only these ids at the answer position, so they must be distinct: two
    labels sharing a first token could never be told apart.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    ids = [tok.encode(" " + name, add_special_tokens=False).ids[:1] for name in names]
    empty = [n for n, i in zip(names, ids) if not i]
    if empty:
        raise UserError(f"--label-names {','.join(empty)}: the tokenizer gives no token for these words")
    first: dict[int, str] = {}
    for name, (token, *_) in zip(names, ids):
        if token in first:
            raise UserError(
                f"--label-names {first[token]!r} and {name!r} start with the same token ({token}, "
                f"{tok.id_to_token(token)!r}); rename one so that every label word starts differently"
            )
        first[token] = name
    return [i[0] for i in ids]


def export(req: ExportRequest) -> Manifest:
    """Write a bundle to ``req.out``; on any failure nothing is left there."""
    check_request(req)
    out = Path(req.out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        manifest = _export_into(tmp, req)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _export_into(tmp: Path, req: ExportRequest) -> Manifest:
    from fwdllm.export.models import load

    torch.manual_seed(0)
    t_start = time.perf_counter()
    loaded = load(req.model, req.task)
    word_ids = (
        label_word_ids(loaded.tokenizer_file, req.label_names)
        if req.task == Task.CAUSAL_LM and req.label_names
        else None
    )
    plan = build_plan(loaded.model, req.task, req.num_labels, req.peft, word_ids)
    spec = plan.spec
    max_pos = spec.max_positions(loaded.config)
    if req.seq_len > max_pos:
        raise UserError(
            f"--seq-len {req.seq_len} is above this model's {max_pos} positions; use --seq-len {max_pos} or less"
        )
    exporters = _exporters(req.formats)
    precisions = {f: _precisions_for(f, exporters[f].PRECISIONS, req.precisions) for f in req.formats}
    pm = PerturbableModel(loaded.model, plan).eval()
    theta0 = plan.theta0().numpy()
    save_theta(tmp / THETA_FILE, plan.layout, theta0)
    shutil.copyfile(loaded.tokenizer_file, tmp / "tokenizer.json")
    vocab = int(loaded.config.vocab_size)
    seq = min(req.validation_seq_len, req.seq_len)
    cut = req.peft.trainable_layers != "all" and plan.cut_layer is not None
    ctx = ExportContext(
        dir=tmp, req=req, loaded=loaded, plan=plan, pm=pm, cut=cut, hidden_size=spec.hidden_size(loaded.config)
    )
    ctx.sample, ctx.want = ctx.batch(2, seq, VALIDATION_ROWS, seed=1)
    ctx.trace_sample = sample_batch(plan, vocab, 2, seq, 2, theta0, seed=2)
    with torch.no_grad():
        ctx.trace_hidden = (
            pm.prefix(
                torch.from_numpy(ctx.trace_sample["input_ids"]), torch.from_numpy(ctx.trace_sample["attention_mask"])
            ).numpy()
            if cut
            else None
        )
    graphs = []
    for fmt in req.formats:
        graphs += exporters[fmt].export_all(ctx, precisions[fmt])
    cfg = loaded.config
    manifest = Manifest(
        model=ModelInfo(
            source=loaded.source,
            architecture=spec.name,
            task=req.task,
            max_seq_len=req.seq_len,
            tokenizer="tokenizer.json",
            num_labels=plan.num_labels,
            labels=req.label_names,
            num_layers=plan.num_layers,
            hidden_size=ctx.hidden_size,
            pad_token_id=getattr(cfg, "pad_token_id", None),
            label_token_ids=word_ids,
            extra={
                "model_type": cfg.model_type,
                "max_position_embeddings": max_pos,
                "vocab_size": vocab,
                "pooling": "mean" if req.task == Task.SEQ_CLS else None,
                "head": _head_description(req.task, word_ids),
            },
        ),
        peft=PeftInfo(method=req.peft.method, trainable_layers=req.peft.trainable_layers, config=req.peft.config()),
        theta=plan.layout,
        graphs=graphs,
        cut_layer=plan.cut_layer if cut else None,
        fwdllm_version=__version__,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )
    ctx.timings["total"] = round(time.perf_counter() - t_start, 3)
    manifest.model.extra["export_timings_s"] = ctx.timings
    write_manifest(tmp, manifest)
    return manifest
