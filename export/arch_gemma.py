"""Gemma 2 and Gemma 3 (text) decoders.

The shared decoder walk covers what the stages see: the embedding module scales by
sqrt(hidden) itself, sliding-window and global layers alternate (``config.layer_types``), and
Gemma 3's local and global layers rotate with different bases. GeGLU, the extra pre/post
feed-forward norms, attention-logit soft-capping and Gemma 3's q/k norms are inside HF's layers.

What the layers do not do is the final-logit soft-capping (Gemma 2: logits = cap·tanh(logits/cap),
cap 30), which HF applies after the LM head; both heads here apply it too, so next-token and
label-word logits equal the model's own.
"""

from dataclasses import dataclass

import torch
from torch import nn

from fwdllm.export.arch_llama import DecoderSpec


class SoftCapped(nn.Module):
    """``cap · tanh(head(h) / cap)``: Gemma's final-logit soft-capping over a (row-restricted) LM head."""

    def __init__(self, head: nn.Module, cap: float):
        super().__init__()
        self.head, self.cap = head, float(cap)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.cap * torch.tanh(self.head(hidden) / self.cap)


@dataclass(frozen=True)
class GemmaSpec(DecoderSpec):
    def lm_head(self, model):
        return _capped(model, super().lm_head(model))

    def label_head(self, model, token_ids):
        return _capped(model, super().label_head(model, token_ids))


def _capped(model, head: nn.Module) -> nn.Module:
    cap = getattr(model.config, "final_logit_softcapping", None)
    return head if cap is None else SoftCapped(head, cap)


SPEC = GemmaSpec(
    name="gemma",
    model_types=("gemma2", "gemma3_text"),
    embeddings="model.embed_tokens",
    layers="model.layers",
    attention_output="self_attn.o_proj",
    ffn_output="mlp.down_proj",
    lora_targets=("q_proj", "v_proj"),
    hf_prefix="model",
    causal=True,
)
