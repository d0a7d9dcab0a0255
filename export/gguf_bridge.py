"""`--format gguf`: hands the frozen Llama and θ's layout to the GGUF writer (gguf.py), which
writes base models for llama.cpp and carries θ as a LoRA adapter."""

from __future__ import annotations

from fwdllm.errors import UserError
from fwdllm.proto.manifest import PeftInfo

PRECISIONS = ("f16", "q8_0", "q4_0")


def export_all(ctx, precisions: list[str]) -> list:
    if ctx.plan.task != "causal-lm":
        raise UserError("--format gguf is for llama decoders (--task causal-lm); export encoders with --format onnx,tflite")
    from fwdllm.export.gguf import export_gguf

    peft = ctx.req.peft
    with ctx.step("gguf: base models"):
        return export_gguf(ctx.loaded.model, ctx.plan.layout, ctx.plan.theta0().numpy(),
                           PeftInfo(peft.method, peft.trainable_layers, peft.config()), ctx.dir, precisions)
