"""Phi-3 decoders (Phi-3, Phi-3.5): Llama's layout with fused projections and LongRoPE.

Queries, keys and values come from one ``qkv_proj`` and the MLP's gate and up halves from one
``gate_up_proj``, so LoRA's default target is ``qkv_proj`` (a low-rank update of all three at
once). Every layer slides when the checkpoint sets ``sliding_window`` (Phi-3-mini: 2047); partial
rotary dimensions are the rotary embedding's own business.

LongRoPE (the 128k checkpoints, Phi-3.5) rotates with short factors up to the original context
length and long ones beyond. HF chooses per call by overwriting its ``inv_freq`` buffer, which
TorchScript's ONNX export cannot trace (``aten::copy``); ``rotary`` makes the same choice with a
graph op, so one graph serves both ranges.
"""

from dataclasses import dataclass

import torch

from fwdllm.export.arch_llama import DecoderSpec


@dataclass(frozen=True)
class Phi3Spec(DecoderSpec):
    def rotary(self, model, hidden, position_ids, kind):
        rot = model.model.rotary_emb
        if rot.rope_type != "longrope":
            return super().rotary(model, hidden, position_ids, kind)
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        original = model.config.rope_parameters["original_max_position_embeddings"]
        long_inv_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](model.config, None, seq_len=original + 1)
        inv_freq = torch.where(position_ids.max() + 1 > original, long_inv_freq, rot.original_inv_freq)
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * rot.attention_scaling).to(hidden.dtype), (emb.sin() * rot.attention_scaling).to(
            hidden.dtype
        )


SPEC = Phi3Spec(
    name="phi3",
    model_types=("phi3",),
    embeddings="model.embed_tokens",
    layers="model.layers",
    attention_output="self_attn.o_proj",
    ffn_output="mlp.down_proj",
    lora_targets=("qkv_proj",),
    hf_prefix="model",
    causal=True,
)
