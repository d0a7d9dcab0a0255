"""DistilBERT: q_lin/v_lin attention, FFN lin1/lin2, no token types."""

from dataclasses import dataclass

from fwdllm.export.archs import ArchSpec


@dataclass(frozen=True)
class DistilBertSpec(ArchSpec):
    def embed(self, model, input_ids, token_type_ids=None):  # no token types: never given one
        return model.embeddings(input_ids)

    def max_positions(self, config):
        return int(config.max_position_embeddings)

    def hidden_size(self, config):
        return int(config.dim)


SPEC = DistilBertSpec(
    name="distilbert",
    model_types=("distilbert",),
    embeddings="embeddings",
    layers="transformer.layer",
    attention_output="attention.out_lin",
    ffn_output="ffn.lin2",
    lora_targets=("q_lin", "v_lin"),
    hf_prefix="distilbert",
)
