"""ALBERT: factorised embeddings (projected by ``encoder.embedding_hidden_mapping_in``) and
layers shared across depth. A trainable tensor in a shared layer is used from layer 0 on, so
ALBERT models are only cut when the head alone is trained."""

from dataclasses import dataclass

from fwdllm.export.archs import ArchSpec, get_module


@dataclass(frozen=True)
class AlbertSpec(ArchSpec):
    def num_layers(self, model):
        return int(model.config.num_hidden_layers)

    def _group(self, model, i):
        cfg = model.config
        return int(i / (cfg.num_hidden_layers / cfg.num_hidden_groups))

    def layer_module(self, model, i):
        return model.encoder.albert_layer_groups[self._group(model, i)]

    def stage_modules(self, model):
        stages = super().stage_modules(model)
        stages[0].append(model.encoder.embedding_hidden_mapping_in)
        return stages

    def embed(self, model, input_ids, token_type_ids=None):
        embeddings = get_module(model, self.embeddings)(input_ids=input_ids, token_type_ids=token_type_ids)
        return model.encoder.embedding_hidden_mapping_in(embeddings)


SPEC = AlbertSpec(
    name="albert",
    model_types=("albert",),
    embeddings="embeddings",
    layers="encoder.albert_layer_groups",
    attention_output="attention.dense",
    ffn_output="ffn_output",
    lora_targets=("query", "value"),
    hf_prefix="albert",
)
