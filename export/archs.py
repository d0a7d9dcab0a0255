"""How fwdllm walks a Hugging Face model, one small spec per architecture (arch_*.py).

The exporter never calls a model's top-level ``forward``: it runs the model as a list of
*stages* (stage 0 = embeddings, stage i = transformer layer i-1) so that it can cut the
model between layers (prefix/suffix graphs) and widen the batch to ``P * B`` at the first
stage that holds a trainable tensor. A spec says where the stages are, how to call one,
which Linears are the attention and FFN outputs (where adapters go) and what the default
LoRA targets are. Adding an architecture is one new module registered in ``ARCHS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fwdllm.errors import UserError


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


@dataclass(frozen=True)
class ArchSpec:
    """Encoder architectures (bidirectional attention, mean pooling head)."""

    name: str
    model_types: tuple[str, ...]
    embeddings: str  # module path of the embeddings stage
    layers: str  # module path of the layer list
    attention_output: str  # Linear inside a layer whose output gets the attention adapter
    ffn_output: str  # Linear inside a layer whose output gets the FFN adapter
    lora_targets: tuple[str, ...]  # default LoRA target leaf names (query/value)
    hf_prefix: str  # attribute of *ForSequenceClassification holding the base model
    causal: bool = False

    # ----- stages -----
    def num_layers(self, model: nn.Module) -> int:
        return len(get_module(model, self.layers))

    def layer_module(self, model: nn.Module, i: int) -> nn.Module:
        return get_module(model, self.layers)[i]

    def stage_modules(self, model: nn.Module) -> list[list[nn.Module]]:
        """Modules each stage runs; a module shared by stages belongs to the first."""
        first = [get_module(model, self.embeddings)]
        return [first] + [[self.layer_module(model, i)] for i in range(self.num_layers(model))]

    def embed(
        self, model: nn.Module, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        return get_module(model, self.embeddings)(input_ids=input_ids, token_type_ids=token_type_ids)

    def context(self, model: nn.Module, attention_mask: torch.Tensor, hidden: torch.Tensor) -> dict[str, Any]:
        """What every layer call needs besides the hidden states (here: the additive mask)."""
        m = attention_mask.to(hidden.dtype)[:, None, None, :]
        return {"attention_mask": (1.0 - m) * torch.finfo(hidden.dtype).min}

    def run_layer(self, model: nn.Module, i: int, hidden: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        out = self.layer_module(model, i)(hidden, ctx["attention_mask"])
        return out[0] if isinstance(out, tuple) else out

    def run_layer_at(
        self, model: nn.Module, i: int, hidden: torch.Tensor, ctx: dict[str, Any], where: torch.Tensor
    ) -> torch.Tensor:
        """Layer ``i``'s output ``[N, 1, H]`` at one position per row (``where`` [N]): what a label-word
        head needs from the last layer. This default runs the whole layer; a spec may compute only
        that position (its keys and values still cover every position)."""
        out = self.run_layer(model, i, hidden, ctx)
        return torch.gather(out, 1, where[:, None, None].expand(-1, 1, out.shape[-1]))

    def final(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def lm_head(self, model: nn.Module) -> nn.Module:
        """Decoders: hidden states ``[..., H]`` to next-token logits over the whole vocabulary, as the
        model's own forward computes them (an architecture that transforms its logits overrides this)."""
        return model.get_output_embeddings()

    def label_head(self, model: nn.Module, token_ids: list[int]) -> nn.Module:
        """Decoders: the LM head restricted to the vocabulary rows ``token_ids`` (the label words),
        mapping final hidden states ``[..., H]`` to ``[..., C]``. A graph holds these C rows only,
        never the vocabulary-wide matrix. An architecture that transforms its logits (Gemma's
        soft-capping) overrides this."""
        return vocab_rows(model.get_output_embeddings(), token_ids)

    def max_positions(self, config: Any) -> int:
        return int(config.max_position_embeddings)

    def hidden_size(self, config: Any) -> int:
        return int(config.hidden_size)


def vocab_rows(lm_head: nn.Linear, token_ids: list[int]) -> nn.Linear:
    """A frozen Linear holding the rows ``token_ids`` of ``lm_head`` (and of its bias, if any)."""
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    rows = nn.Linear(lm_head.in_features, len(ids), bias=lm_head.bias is not None)
    with torch.no_grad():
        rows.weight.copy_(lm_head.weight[ids])
        if lm_head.bias is not None:
            rows.bias.copy_(lm_head.bias[ids])
    return rows.requires_grad_(False)


def _registry() -> dict[str, ArchSpec]:
    from fwdllm.export import (
        arch_albert,
        arch_bert,
        arch_distilbert,
        arch_gemma,
        arch_llama,
        arch_phi3,
        arch_qwen2,
        arch_roberta,
    )

    modules = (arch_bert, arch_distilbert, arch_albert, arch_roberta, arch_llama, arch_qwen2, arch_gemma, arch_phi3)
    specs = [m.SPEC for m in modules]
    return {t: s for s in specs for t in s.model_types}


def spec_for(model_type: str) -> ArchSpec:
    archs = _registry()
    if model_type not in archs:
        raise UserError(
            f"architecture {model_type!r} is not supported; fwdllm exports {sorted(archs)}. "
            "Add a spec module export/arch_<name>.py for it, or pass a checkpoint of a supported architecture."
        )
    return archs[model_type]
