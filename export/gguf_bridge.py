"""`fwdllm export --format gguf`: the pipeline's hook into ``gguf.py``, validated on llama.cpp itself.

Each precision's base model runs the pipeline's validation batch through the device's own
llama.cpp backend (θ as a LoRA adapter) and must match the PyTorch reference within
``TOLERANCE`` before the graph counts.
"""

from __future__ import annotations

from fwdllm.export.gguf import PRECISIONS, export_gguf, smollm2_gguf
from fwdllm.proto.manifest import Manifest, ModelInfo, PeftInfo

__all__ = ["PRECISIONS", "TOLERANCE", "export_all"]

#: Scale-relative loss error allowed against PyTorch at validation (random tokens, θ0 + 0.05·N(0,1)).
#: Measured on SmolLM2: f16 1e-5, q8_0 2e-3, q4_0 0.053. A 4-bit model is not meant to match
#: the loss closely; its real check is top-1 next-token agreement on text (tests/test_llama_backend.py).
TOLERANCE = {"f16": 1e-3, "q8_0": 2e-2, "q4_0": 0.15}


def export_all(ctx, precisions: list[str]) -> list:
    """Base GGUFs at each precision, each validated on llama.cpp against the PyTorch reference."""
    from fwdllm.device_runtime.backend import Batch
    from fwdllm.device_runtime.llama_backend import LlamaBackend

    req, plan = ctx.req, ctx.plan
    peft = PeftInfo(method=req.peft.method, trainable_layers=req.peft.trainable_layers, config=req.peft.config())
    tokenizer = smollm2_gguf() if ctx.loaded.source == "smollm2" else ctx.loaded.tokenizer_file
    with ctx.step("gguf: write and quantize"):
        specs = export_gguf(ctx.loaded.model, plan.layout, plan.theta0().numpy(), peft, ctx.dir, precisions, tokenizer)
    # The backend reads θ's layout, LoRA alpha and the context length from a manifest.
    manifest = Manifest(
        model=ModelInfo(source=ctx.loaded.source, architecture="llama", task="causal-lm",
                        max_seq_len=req.seq_len, tokenizer="tokenizer.json"),
        peft=peft, theta=plan.layout, graphs=specs,
    )
    batch = Batch.of(ctx.sample["input_ids"], ctx.sample["attention_mask"], ctx.sample["labels"])
    for spec in specs:
        with ctx.step(f"gguf {spec.precision}: validate"):
            backend = LlamaBackend(ctx.dir, manifest, spec, {"threads": 1})
            try:
                spec.validation = ctx.validate(
                    lambda role, feeds: {"loss": backend.losses(batch, feeds["theta"])},
                    ["full"], TOLERANCE[spec.precision], f"gguf {spec.precision}",
                )["full"]
            finally:
                backend.close()
    return specs
