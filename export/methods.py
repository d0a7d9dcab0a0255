"""PEFT methods as *sites*: where in the frozen model a trainable tensor enters, and its initial value.

Each method is one small module (peft_head, peft_bitfit, peft_adapter, peft_lora) exposing
``METHOD``, a callable ``(model, spec, modules, options) -> list[Site]`` over the modules of
the layers it may touch. The exporter turns the sites into θ's layout and into the small
ops that read θ (perturbable.py); the classification head is added for seq-cls by every
method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fwdllm.errors import UserError


@dataclass
class Site:
    """One place where θ enters the graph. ``tensors`` are (suffix, initial value) in θ order."""

    path: str  # module path inside the model ("" for the head)
    kind: str  # bias | lora | adapter | head
    tensors: list[tuple[str, torch.Tensor]]
    options: dict[str, Any] = field(default_factory=dict)

    def names(self) -> list[str]:
        return [f"{self.path}.{suffix}" if self.path else suffix for suffix, _ in self.tensors]


Method = Callable[[nn.Module, Any, list[tuple[str, nn.Module]], dict[str, Any]], list[Site]]


def methods() -> dict[str, Method]:
    from fwdllm.export import peft_adapter, peft_bitfit, peft_head, peft_lora

    return {
        "head": peft_head.METHOD,
        "bitfit": peft_bitfit.METHOD,
        "adapter": peft_adapter.METHOD,
        "lora": peft_lora.METHOD,
    }


def parse_trainable_layers(text: str, num_layers: int) -> list[int]:
    """Stages a method may touch: 'all' = embeddings + every layer, 'top:K' = the top K layers, 'head' = none."""
    if text == "all":
        return list(range(num_layers + 1))
    if text == "head":
        return []
    if text.startswith("top:"):
        try:
            k = int(text[4:])
        except ValueError:
            k = -1
        if not 1 <= k <= num_layers:
            raise UserError(
                f"--trainable-layers {text}: K must be an integer in "
                f"1..{num_layers} (the model has {num_layers} layers)"
            )
        return list(range(num_layers - k + 1, num_layers + 1))
    raise UserError(f"--trainable-layers {text!r} is not one of head, top:K, all")


def matches(path: str, target: str) -> bool:
    """A module path names ``target`` when it equals it or ends with ``.target``."""
    return path == target or path.endswith("." + target)
