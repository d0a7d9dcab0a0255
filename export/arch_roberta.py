"""RoBERTa: BERT's layout; its embeddings derive position ids from the padding id themselves."""

from fwdllm.export.archs import ArchSpec

SPEC = ArchSpec(
    name="roberta",
    model_types=("roberta", "xlm-roberta"),
    embeddings="embeddings",
    layers="encoder.layer",
    attention_output="attention.output.dense",
    ffn_output="output.dense",
    lora_targets=("query", "value"),
    hf_prefix="roberta",
)
