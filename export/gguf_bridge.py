"""`fwdllm export --format gguf`: the pipeline's hook into ``gguf.py``, validated on llama.cpp itself.

Hands the frozen decoder (llama, qwen2, qwen3) and θ's layout to the GGUF writer, which writes base models for
llama.cpp and carries θ as a LoRA adapter. Each precision then runs the pipeline's
validation batch through the device's own llama.cpp backend and must match the PyTorch
reference within its tolerance before the graph counts. A label-word bundle cut at a
layer also gets a suffix GGUF per precision, validated the same way through the backend's
prefix reuse (hidden states from the base model, the layers above from the suffix).
"""

from __future__ import annotations

import numpy as np

from fwdllm.export.gguf import PRECISIONS  # noqa: F401 (the pipeline reads each format module's PRECISIONS)
from fwdllm.proto.manifest import Manifest, ModelInfo, PeftInfo
from fwdllm.proto.names import GraphFormat, GraphRole, Task

#: Scale-relative error allowed against PyTorch at validation (random tokens, θ0 + 0.05·N(0,1)).
#: Measured on SmolLM2, next-token loss: f16 2e-4, q8_0 1e-3, q4_0 0.053. A 4-bit model is not
#: meant to match closely; its check is top-1 next-token agreement on text (tests/test_llama_backend.py).
TOLERANCE = {"f16": 5e-3, "q8_0": 2e-2, "q4_0": 0.15}

#: The same for label-word bundles, whose loss is a softmax over a few logits several units
#: apart, so the quantization noise of short random prompts shows in full. Measured on SmolLM2
#: (top:2, 5 BBC topic words, 5 validation seeds) against f16: q8_0 0.012–0.12 (mostly the loss;
#: the logits move together), q4_0 0.21–1.2. f16 2.9e-3 against PyTorch. q4_0 is checked only for
#: gross errors; this model is not usable at 4 bits (export/BUNDLE.md).
LABEL_WORD_TOLERANCE = {"f16": 5e-3, "q8_0": 0.25, "q4_0": 2.5}


def export_all(ctx, precisions: list[str]) -> list:
    """Base (and suffix) GGUFs at each precision, each validated on llama.cpp against the PyTorch reference."""
    from fwdllm.device_runtime.backend import Batch
    from fwdllm.device_runtime.llama_backend import LlamaBackend
    from fwdllm.export.gguf import export_gguf, tokenizer_source
    from fwdllm.export.graphs import errors

    req, plan = ctx.req, ctx.plan
    peft = PeftInfo(method=req.peft.method, trainable_layers=req.peft.trainable_layers, config=req.peft.config())
    tokenizer = tokenizer_source(ctx.loaded.source, ctx.loaded.tokenizer_file)
    words = list(plan.label_token_ids or [])
    cut = plan.cut_layer if ctx.cut and words and (plan.cut_layer or 0) >= 1 else None
    with ctx.step("gguf: base models" + (" and suffixes" if cut else "")):
        specs = export_gguf(
            ctx.loaded.model,
            plan.layout,
            plan.theta0().numpy(),
            peft,
            ctx.dir,
            precisions,
            tokenizer,
            suffix=(cut, words) if cut else None,
        )
    # The backend reads θ's layout, LoRA alpha, the context length and the cut from a manifest.
    manifest = Manifest(
        model=ModelInfo(
            source=ctx.loaded.source,
            architecture=ctx.loaded.model.config.model_type,
            task=Task.CAUSAL_LM,
            max_seq_len=req.seq_len,
            tokenizer="tokenizer.json",
            num_labels=plan.num_labels,
            labels=req.label_names,
            label_token_ids=words or None,
        ),
        peft=peft,
        theta=plan.layout,
        graphs=specs,
        cut_layer=cut,
    )
    batch = Batch.of(ctx.sample["input_ids"], ctx.sample["attention_mask"], ctx.sample["labels"])
    tolerance = LABEL_WORD_TOLERANCE if words else TOLERANCE

    def run(backend, feeds):
        out = {"loss": backend.losses(batch, feeds["theta"])}
        if plan.classifies:
            out["logits"] = np.stack([backend.logits(batch, row) for row in feeds["theta"]])
        return out

    base_out: dict[str, dict[str, np.ndarray]] = {}
    for spec in specs:  # each base precision comes before its suffix
        what = f"gguf {spec.precision}" + (" suffix" if spec.role == GraphRole.SUFFIX else "")
        with ctx.step(f"{what}: validate"):
            base = manifest.graph(GraphFormat.GGUF, GraphRole.BASE, spec.precision)
            backend = LlamaBackend(
                ctx.dir, manifest, base, {"threads": 1, "prefix_reuse": spec.role == GraphRole.SUFFIX}
            )
            outputs: dict[str, dict[str, np.ndarray]] = {}
            try:
                spec.validation = ctx.validate(
                    lambda role, feeds, outputs=outputs, backend=backend: outputs.setdefault(role, run(backend, feeds)),
                    [GraphRole.FULL],
                    tolerance[spec.precision],
                    what,
                )[GraphRole.FULL]
            finally:
                backend.close()
        if spec.role == GraphRole.SUFFIX:
            spec.validation["max_rel_err_vs_base"] = errors(outputs[GraphRole.FULL], base_out[spec.precision])[
                "max_rel_err"
            ]
            spec.validation["reference"] = "prefix (base GGUF) then suffix vs transformers+peft (PyTorch)"
        else:
            base_out[spec.precision] = outputs[GraphRole.FULL]
    return specs
