"""TFLite graphs via litert-torch (B, S and P fixed at export, ids int32); fp16 and int8 by ai-edge-quantizer.

Also measures how much of each graph XNNPACK takes (the delegate that needs constant
weights): see ``delegation``.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from fwdllm.errors import UserError
from fwdllm.export.graphs import ROLE_INPUTS, outputs, roles, tensor_specs
from fwdllm.export.perturbable import GraphModule, PerturbableModel
from fwdllm.proto.names import GraphFormat, GraphRole, Precision

log = logging.getLogger(__name__)

PRECISIONS = (Precision.FP32, Precision.FP16, Precision.INT8)
# Scale-relative error vs PyTorch (graphs.errors). fp16 = FULLY_CONNECTED weights stored as
# float16 (measured 1e-3 on MiniLM); int8 = dynamic range (int8 weights, float activations
# quantized per call), like ONNX int8 dominated by noise in the pooled features (0.05-0.1).
TOLERANCE: dict[str, float] = {Precision.FP32: 1e-4, Precision.FP16: 1e-2, Precision.INT8: 0.4}


def check_convertible(config) -> None:
    """Refuse, before minutes of conversion, a model litert-torch is known to convert wrongly."""
    heads, kv_heads = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    if kv_heads == 1 and heads and heads > 1:
        # q @ repeat(k).T with one key/value head comes out of litert-torch wrong (2 query heads over one key/value
        # head, unit-normal inputs: scores off by up to 18), where 2 or more key/value heads convert exactly
        raise UserError(
            f"--format tflite: this decoder has a single key/value head for its {heads} query heads (multi-query "
            "attention), whose attention litert-torch converts wrongly; export it with --format onnx (or gguf)"
        )


def convert_role(pm: PerturbableModel, role: str, feeds: dict[str, np.ndarray], path: Path) -> None:
    import litert_torch

    names, outs = ROLE_INPUTS[role], outputs(pm.plan, role)
    kwargs = {n: torch.from_numpy(np.asarray(feeds[n])) for n in names}
    with torch.no_grad():
        litert_torch.convert(GraphModule(pm, role, names, outs).eval(), sample_kwargs=kwargs).export(str(path))


def quantize(src: Path, dst: Path, precision: str) -> None:
    """int8: per-channel int8 weights, activations quantized dynamically at run time.
    fp16: the frozen FULLY_CONNECTED weights cast to float16 (dequantized on load)."""
    from ai_edge_quantizer import qtyping, quantizer, recipe
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    q = quantizer.Quantizer(str(src))
    if precision == Precision.INT8:
        q.load_quantization_recipe(recipe.dynamic_wi8_afp32())
    else:
        q.add_weight_only_config(
            regex=".*",
            operation_name=qtyping.TFLOperationName.FULLY_CONNECTED,
            num_bits=16,
            algorithm_key=AlgorithmName.FLOAT_CASTING,
        )
    q.quantize().export_model(str(dst), overwrite=True)


def interpreter(path: Path, threads: int = 1, xnnpack: bool = True):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    kw = {} if xnnpack else {"experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
    return Interpreter(model_path=str(path), num_threads=threads, **kw)


def run(path: Path, feeds: dict[str, np.ndarray], threads: int = 1, xnnpack: bool = True) -> dict[str, np.ndarray]:
    """Call the graph's signature by input names (ints are fed as int32, as the graph declares)."""
    runner = interpreter(path, threads, xnnpack).get_signature_runner()
    details = runner.get_input_details()
    out = runner(**{n: np.asarray(feeds[n]).astype(d["dtype"]) for n, d in details.items()})
    return {k: np.asarray(v) for k, v in out.items()}


def delegation(path: Path) -> dict:
    """Ops XNNPACK takes: trace the executed graph back from the outputs (delegate nodes replace
    the ops they took); what is reached outside a delegate node runs on builtin kernels."""
    it = interpreter(path)
    it.allocate_tensors()
    ops = it._get_ops_details()
    originals = [o for o in ops if o["op_name"] != "DELEGATE"]
    producer = {}
    for o in ops:  # delegate nodes come last, so they win for the tensors they produce
        for t in o["outputs"]:
            producer[int(t)] = o
    seen, stack = set(), [int(d["index"]) for d in it.get_output_details()]
    while stack:
        o = producer.get(stack.pop())
        if o is None or o["index"] in seen:
            continue
        seen.add(o["index"])
        stack.extend(int(t) for t in o["inputs"] if t >= 0)
    reached = [o for o in ops if o["index"] in seen]
    builtin = [o["op_name"] for o in reached if o["op_name"] != "DELEGATE"]
    return {
        "ops": len(originals),
        "xnnpack": len(originals) - len(builtin),
        "xnnpack_partitions": sum(1 for o in reached if o["op_name"] == "DELEGATE"),
        "builtin": dict(Counter(builtin)),
    }


def export_all(ctx, precisions: list[str]) -> list:
    from fwdllm.proto.manifest import GraphSpec

    check_convertible(ctx.loaded.config)
    req = ctx.req
    fixed = {"B": req.batch_size, "S": req.seq_len, "P": req.perturbations}
    with ctx.step("tflite: reference batch"):
        sample, want = ctx.batch(req.batch_size, req.seq_len, req.perturbations, seed=3)
    role_list = roles(ctx.plan, ctx.cut)
    fp32 = {}
    for role in role_list:
        fp32[role] = ctx.dir / f"{role}.tflite"
        with ctx.step(f"tflite {role}: convert"):
            convert_role(ctx.pm, role, sample, fp32[role])
    specs = []
    for precision in precisions:
        files = {}
        for role in role_list:
            files[role] = fp32[role] if precision == Precision.FP32 else ctx.dir / f"{role}.{precision}.tflite"
            if precision != Precision.FP32:
                with ctx.step(f"tflite {role}: quantize {precision}"):
                    quantize(fp32[role], files[role], precision)
        with ctx.step(f"tflite {precision}: validate"):
            validation = ctx.validate(
                lambda role, feeds, files=files: run(files[role], feeds),
                role_list,
                TOLERANCE[precision],
                f"tflite {precision}",
                sample,
                want,
            )
        for role in role_list:
            ins, outs = tensor_specs(ctx.plan, role, ctx.hidden_size, "int32", fixed)
            specs.append(
                GraphSpec(
                    role=role,
                    format=GraphFormat.TFLITE,
                    precision=precision,
                    file=files[role].name,
                    inputs=ins,
                    outputs=outs,
                    perturbations=req.perturbations if role != GraphRole.PREFIX else None,
                    batch_size=req.batch_size,
                    seq_len=req.seq_len,
                    validation=validation[role],
                    delegation=delegation(files[role]),
                )
            )
    if Precision.FP32 not in precisions:
        for path in fp32.values():
            path.unlink()
    return specs
