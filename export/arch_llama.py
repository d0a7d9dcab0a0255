"""Llama decoders (SmolLM2): causal attention with rotary positions, RMSNorm, tied or untied LM head.

The model object is a ``LlamaForCausalLM``; stages are the token embedding and the decoder
layers, ``final`` applies the last norm. Adapters go after ``o_proj`` and ``down_proj``.
"""

from dataclasses import dataclass

import torch

from fwdllm.export.archs import ArchSpec


@dataclass(frozen=True)
class LlamaSpec(ArchSpec):
    def embed(self, model, input_ids):
        return model.model.embed_tokens(input_ids)

    def context(self, model, attention_mask, hidden):
        seq = attention_mask.shape[1]
        pos = torch.arange(seq, device=hidden.device)
        allowed = (pos[None, :] <= pos[:, None])[None, None] & attention_mask.bool()[:, None, None, :]
        zero = torch.zeros((), dtype=hidden.dtype)
        additive = torch.where(allowed, zero, torch.finfo(hidden.dtype).min)
        position_ids = pos[None, :]
        return {
            "attention_mask": additive,
            "position_ids": position_ids,
            "position_embeddings": model.model.rotary_emb(hidden, position_ids=position_ids),
        }

    def run_layer(self, model, i, hidden, ctx):
        out = self.layer_module(model, i)(
            hidden,
            attention_mask=ctx["attention_mask"],
            position_ids=ctx["position_ids"],
            position_embeddings=ctx["position_embeddings"],
        )
        return out[0] if isinstance(out, tuple) else out

    def final(self, model, hidden):
        return model.model.norm(hidden)


SPEC = LlamaSpec(
    name="llama",
    model_types=("llama",),
    embeddings="model.embed_tokens",
    layers="model.layers",
    attention_output="self_attn.o_proj",
    ffn_output="mlp.down_proj",
    lora_targets=("q_proj", "v_proj"),
    hf_prefix="model",
    causal=True,
)
