"""ONNX graphs: legacy TorchScript export (dynamo=False), dynamic B, S and P; int8 by onnxruntime dynamic
quantization."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from fwdllm.export.graphs import ROLE_INPUTS, outputs
from fwdllm.export.perturbable import GraphModule, PerturbableModel
from fwdllm.proto.names import GraphFormat, Precision

log = logging.getLogger(__name__)

OPSET = 17


def export_role(
    pm: PerturbableModel, role: str, sample: dict[str, np.ndarray], hidden: np.ndarray | None, path: Path
) -> None:
    """Trace one role to ``path``. The trace uses a P=2 sample; every axis is declared dynamic."""
    feeds = dict(sample, hidden=hidden)
    names = ROLE_INPUTS[role]
    args = tuple(torch.from_numpy(np.asarray(feeds[n])) for n in names)
    outs = outputs(pm.plan, role)
    seq_axes = {0: "B", 1: "S"}
    axes = {
        "input_ids": seq_axes,
        "attention_mask": seq_axes,
        "hidden": seq_axes,
        "labels": {0: "B"} if pm.plan.classifies else seq_axes,
        "theta": {0: "P"},
        "loss": {0: "P"},
        "logits": {0: "P", 1: "B"},
    }
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            GraphModule(pm, role, names, outs).eval(),
            args,
            str(path),
            input_names=list(names),
            output_names=list(outs),
            dynamic_axes={n: axes[n] for n in (*names, *outs)},
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 of the MatMuls with constant weights (the frozen ones); θ's MatMuls stay float."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8, per_channel=True)


def run(path: Path, feeds: dict[str, np.ndarray], threads: int = 1) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    outs = sess.run(None, {n: np.asarray(feeds[n]) for n in names})
    return dict(zip([o.name for o in sess.get_outputs()], outs))


PRECISIONS = (Precision.FP32, Precision.INT8)
# Scale-relative error vs PyTorch (graphs.errors). int8 (per-channel dynamic) measured 0.26 on MiniLM
# with a random head: quantization noise in the pooled features, projected by a random head.
TOLERANCE: dict[str, float] = {Precision.FP32: 1e-4, Precision.INT8: 0.4}


def export_all(ctx, precisions: list[str]) -> list:
    """Every ONNX role at every precision, each validated against the reference before it counts."""
    from fwdllm.export.graphs import roles, tensor_specs
    from fwdllm.proto.manifest import GraphSpec

    specs = []
    role_list = roles(ctx.plan, ctx.cut)
    fp32 = {}
    for role in role_list:
        path = ctx.dir / f"{role}.onnx"
        with ctx.step(f"onnx {role}: export"):
            export_role(ctx.pm, role, ctx.trace_sample, ctx.trace_hidden, path)
        fp32[role] = path
    for precision in precisions:
        files = {}
        for role in role_list:
            if precision == Precision.FP32:
                files[role] = fp32[role]
            else:
                files[role] = ctx.dir / f"{role}.{precision}.onnx"
                with ctx.step(f"onnx {role}: quantize {precision}"):
                    quantize_int8(fp32[role], files[role])
        with ctx.step(f"onnx {precision}: validate"):
            validation = ctx.validate(
                lambda role, feeds, files=files: run(files[role], feeds),
                role_list,
                TOLERANCE[precision],
                f"onnx {precision}",
            )
        for role in role_list:
            ins, outs = tensor_specs(ctx.plan, role, ctx.hidden_size, "int64")
            specs.append(
                GraphSpec(
                    role=role,
                    format=GraphFormat.ONNX,
                    precision=precision,
                    file=files[role].name,
                    inputs=ins,
                    outputs=outs,
                    validation=validation[role],
                )
            )
    if Precision.FP32 not in precisions:
        for path in fp32.values():
            path.unlink()
    return specs
