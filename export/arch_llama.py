"""Llama decoders (SmolLM2) and the stage walk every Llama-shaped Hugging Face decoder shares.

The model object is a ``*ForCausalLM``; stages are the token embedding and the decoder
layers, ``final`` applies the last norm. Adapters go after ``o_proj`` and ``down_proj``.
``DecoderSpec`` is that walk for any decoder whose layers take HF's additive mask, position
ids and the rotary cos/sin (Qwen, Gemma, Phi-3 subclass it): the layers themselves carry each
architecture's differences (biases, q/k norms, soft-capping), the spec only builds their inputs.
"""

import sys
from dataclasses import dataclass

import torch

from fwdllm.export.archs import ArchSpec

FULL = "full_attention"
SLIDING = "sliding_attention"


def causal_mask(attention_mask: torch.Tensor, dtype: torch.dtype, window: int | None = None) -> torch.Tensor:
    """HF's additive ``[B, 1, S, S]`` mask: a query sees itself and earlier real tokens; with a
    ``window`` only keys less than ``window`` positions back (HF's sliding-window overlay)."""
    pos = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    back = pos[:, None] - pos[None, :]
    allowed = back >= 0
    if window is not None:
        allowed = allowed & (back < window)
    allowed = allowed[None, None] & attention_mask.bool()[:, None, None, :]
    return torch.where(allowed, torch.zeros((), dtype=dtype), torch.finfo(dtype).min)


@dataclass(frozen=True)
class DecoderSpec(ArchSpec):
    """A Llama-shaped decoder whose layers may differ in attention kind (``config.layer_types``:
    full or sliding-window) and, with it, in their rotary base (Gemma 3's local and global layers)."""

    def embed(self, model, input_ids, token_type_ids=None):  # decoders have no token types: never given one
        return model.model.embed_tokens(input_ids)  # Gemma's embedding module scales by sqrt(hidden) itself

    def layer_types(self, config) -> list[str]:
        """Each layer's attention kind. A config without ``layer_types`` that sets ``sliding_window``
        slides in every layer, as HF runs it (Phi-3)."""
        if getattr(config, "layer_types", None):
            return list(config.layer_types)
        return [SLIDING if getattr(config, "sliding_window", None) else FULL] * config.num_hidden_layers

    def context(self, model, attention_mask, hidden):
        """Position ids, and per attention kind its mask and rotary cos/sin, built once for all layers.

        The full-attention layers' inputs sit at the top level (Llama's one-position last layer reads
        them there); another kind's sit under its name."""
        cfg = model.config
        position_ids = torch.arange(attention_mask.shape[1], device=hidden.device)[None, :]
        ctx = {"position_ids": position_ids}
        for kind in dict.fromkeys(self.layer_types(cfg)):
            inputs = {
                "attention_mask": causal_mask(
                    attention_mask, hidden.dtype, cfg.sliding_window if kind == SLIDING else None
                ),
                "position_embeddings": self.rotary(model, hidden, position_ids, kind),
            }
            if kind == FULL:
                ctx.update(inputs)
            else:
                ctx[kind] = inputs
        return ctx

    def rotary(self, model, hidden, position_ids, kind):
        """cos/sin for layers of ``kind``: rope parameters nested per kind (Gemma 3) select their own base."""
        rotary = model.model.rotary_emb
        if kind in (getattr(model.config, "rope_parameters", None) or {}):
            return rotary(hidden, position_ids, kind)
        return rotary(hidden, position_ids)

    def run_layer(self, model, i, hidden, ctx):
        inputs = ctx.get(self.layer_types(model.config)[i], ctx)
        out = self.layer_module(model, i)(
            hidden,
            attention_mask=inputs["attention_mask"],
            position_ids=ctx["position_ids"],
            position_embeddings=inputs["position_embeddings"],
        )
        return out[0] if isinstance(out, tuple) else out

    def final(self, model, hidden):
        return model.model.norm(hidden)


@dataclass(frozen=True)
class LlamaSpec(DecoderSpec):
    """Llama itself (SmolLM2, Llama 3.x, whose ``rope_type: llama3`` scaling HF's rotary embedding applies)."""

    def run_layer_at(self, model, i, hidden, ctx, where):
        """The decoder layer's output at one position per row: queries, the output projection and
        the MLP run for that position only; keys and values for every position (a quarter of a
        top-4 suffix's work is its last layer, nearly all of it saved)."""
        layer = self.layer_module(model, i)
        attn = layer.self_attn
        hf = sys.modules[type(attn).__module__]  # apply_rotary_pos_emb / repeat_kv of this architecture
        n, s, h = hidden.shape
        at = where[:, None, None].expand(-1, 1, h)
        x = layer.input_layernorm(hidden)
        q = attn.q_proj(torch.gather(x, 1, at)).view(n, 1, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(n, s, -1, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(n, s, -1, attn.head_dim).transpose(1, 2)
        cos, sin = ctx["position_embeddings"]  # [1, S, head_dim]
        q, _ = hf.apply_rotary_pos_emb(q, q, cos[0][where][:, None], sin[0][where][:, None])
        _, k = hf.apply_rotary_pos_emb(k, k, cos, sin)
        k, v = hf.repeat_kv(k, attn.num_key_value_groups), hf.repeat_kv(v, attn.num_key_value_groups)
        mask = ctx["attention_mask"]  # additive [N, 1, S, S]: the answer position's row
        row = torch.gather(mask, 2, where[:, None, None, None].expand(-1, mask.shape[1], 1, s))
        weights = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * attn.scaling + row, dim=-1)
        out = attn.o_proj(torch.matmul(weights, v).transpose(1, 2).reshape(n, 1, -1))
        y = torch.gather(hidden, 1, at) + out
        return y + layer.mlp(layer.post_attention_layernorm(y))


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
