"""BERT and MiniLM (all-MiniLM-L6-v2 is a 6-layer BERT)."""

from fwdllm.export.archs import ArchSpec

SPEC = ArchSpec(
    name="bert",
    model_types=("bert",),
    embeddings="embeddings",
    layers="encoder.layer",
    attention_output="attention.output.dense",
    ffn_output="output.dense",
    lora_targets=("query", "value"),
    hf_prefix="bert",
)
