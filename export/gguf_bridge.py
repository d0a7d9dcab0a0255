"""`fwdllm export --format gguf`: the pipeline's hook into ``gguf.py``, validated on llama.cpp itself.

Hands the frozen Llama and θ's layout to the GGUF writer, which writes base models for
llama.cpp and carries θ as a LoRA adapter. Each precision then runs the pipeline's
validation batch through the device's own llama.cpp backend and must match the PyTorch
reference within ``TOLERANCE`` before the graph counts.
"""

from __future__ import annotations

import numpy as np

from fwdllm.proto.manifest import Manifest, ModelInfo, PeftInfo

PRECISIONS = ("f16", "q8_0", "q4_0")

#: Scale-relative error allowed against PyTorch at validation (random tokens, θ0 + 0.05·N(0,1)).
#: Measured on SmolLM2, next-token loss: f16 2e-4, q8_0 1e-3, q4_0 0.053; label-word logits (their
#: error relative to the largest logit): f16 2.9e-3. A 4-bit model is not meant to match closely;
#: its check is top-1 next-token agreement on text (tests/test_llama_backend.py).
TOLERANCE = {"f16": 5e-3, "q8_0": 2e-2, "q4_0": 0.15}


def export_all(ctx, precisions: list[str]) -> list:
    """Base GGUFs at each precision, each validated on llama.cpp against the PyTorch reference."""
    from fwdllm.device_runtime.backend import Batch
    from fwdllm.device_runtime.llama_backend import LlamaBackend
    from fwdllm.export.gguf import export_gguf, smollm2_gguf

    req, plan = ctx.req, ctx.plan
    peft = PeftInfo(method=req.peft.method, trainable_layers=req.peft.trainable_layers, config=req.peft.config())
    # The default's vocabulary comes from its own GGUF; other checkpoints' from tokenizer.json.
    tokenizer = smollm2_gguf() if ctx.loaded.source == "smollm2" else ctx.loaded.tokenizer_file
    with ctx.step("gguf: base models"):
        specs = export_gguf(ctx.loaded.model, plan.layout, plan.theta0().numpy(), peft, ctx.dir, precisions, tokenizer)
    # The backend reads θ's layout, LoRA alpha and the context length from a manifest.
    manifest = Manifest(
        model=ModelInfo(source=ctx.loaded.source, architecture="llama", task="causal-lm",
                        max_seq_len=req.seq_len, tokenizer="tokenizer.json", num_labels=plan.num_labels,
                        labels=req.label_names, label_token_ids=list(plan.label_token_ids or []) or None),
        peft=peft, theta=plan.layout, graphs=specs,
    )
    batch = Batch.of(ctx.sample["input_ids"], ctx.sample["attention_mask"], ctx.sample["labels"])

    def run(backend, feeds):
        out = {"loss": backend.losses(batch, feeds["theta"])}
        if plan.classifies:
            out["logits"] = np.stack([backend.logits(batch, row) for row in feeds["theta"]])
        return out

    for spec in specs:
        with ctx.step(f"gguf {spec.precision}: validate"):
            backend = LlamaBackend(ctx.dir, manifest, spec, {"threads": 1})
            try:
                spec.validation = ctx.validate(lambda role, feeds: run(backend, feeds),
                                               ["full"], TOLERANCE[spec.precision], f"gguf {spec.precision}")["full"]
            finally:
                backend.close()
    return specs
