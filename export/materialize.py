"""θ written back into a plain Hugging Face model: the independent reference for validation and
the source of `fwdllm export-peft`.

The reference runs the model's own ``forward`` (HF's mask handling, peft's LoRA layers, a
forward hook for adapters), not the stage driver the graphs are traced from, so agreement
between the two checks the exporter.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from fwdllm.export.perturbable import Plan
from fwdllm.proto.names import Task


def _tensors(plan: Plan, theta_row: np.ndarray) -> dict[str, torch.Tensor]:
    return {
        k: torch.from_numpy(np.array(v)) for k, v in plan.layout.split(np.asarray(theta_row, dtype=np.float32)).items()
    }


def _adapter_hook(down_w, down_b, up_w, up_b):
    def hook(module, inputs, output):
        return output + torch.relu(output @ down_w.T + down_b) @ up_w.T + up_b

    return hook


def materialize(model: nn.Module, plan: Plan, theta_row: np.ndarray) -> nn.Module:
    """A copy of ``model`` with one θ row applied; LoRA sites become peft LoRA layers."""
    model = copy.deepcopy(model).eval()
    t = _tensors(plan, theta_row)
    lora_sites = [s for s in plan.sites if s.kind == "lora"]
    for site in plan.sites:
        if site.kind == "bias":
            mod = model.get_submodule(site.path)
            mod.bias = nn.Parameter(t[site.names()[0]].clone(), requires_grad=False)
        elif site.kind == "adapter":
            mod = model.get_submodule(site.path)
            mod.register_forward_hook(_adapter_hook(*(t[n] for n in site.names())))
    if lora_sites:
        from peft import LoraConfig, inject_adapter_in_model

        r = lora_sites[0].tensors[0][1].shape[0]
        cfg = LoraConfig(
            r=r,
            lora_alpha=lora_sites[0].options["scaling"] * r,
            target_modules=[s.path for s in lora_sites],
            lora_dropout=0.0,
        )
        model = inject_adapter_in_model(cfg, model)
        for site in lora_sites:
            mod = model.get_submodule(site.path)
            a, b = (t[n] for n in site.names())
            mod.lora_A["default"].weight.data.copy_(a)
            mod.lora_B["default"].weight.data.copy_(b)
    return model.eval()


def merged(model: nn.Module, plan: Plan, theta_row: np.ndarray) -> nn.Module:
    """``materialize`` with each LoRA update B·A·alpha/r added into its Linear's weight and the peft layer
    replaced by that Linear: the plain model an inference graph is traced from (no LoRA ops left)."""
    from peft.tuners.lora import LoraLayer

    model = materialize(model, plan, theta_row)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, LoraLayer):
            mod.merge()
            parent_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, leaf, mod.get_base_layer())
    return model


def head_logits(plan: Plan, hidden: torch.Tensor, mask: torch.Tensor, theta_row: np.ndarray) -> torch.Tensor:
    """Mean pooling over real tokens, then the Linear head from θ."""
    t = _tensors(plan, theta_row)
    m = mask.to(hidden.dtype).unsqueeze(-1)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    return pooled @ t["classifier.weight"].T + t["classifier.bias"]


@torch.no_grad()
def reference(model: nn.Module, plan: Plan, theta: np.ndarray, input_ids, attention_mask, labels):
    """Per θ row, loss (and logits for seq-cls) from the HF model with that row applied:
    ``(loss[P], logits[P,B,C] | None)``."""
    losses, all_logits = [], []
    ids, mask, lab = (torch.as_tensor(np.asarray(x)).long() for x in (input_ids, attention_mask, labels))
    for row in np.asarray(theta, dtype=np.float32):
        m = materialize(model, plan, row)
        out = m(input_ids=ids, attention_mask=mask)
        if plan.label_token_ids:  # label words: their logits after each prompt's last token
            last = mask.sum(1) - 1
            logits = out.logits[torch.arange(len(last)), last][:, list(plan.label_token_ids)]
            losses.append(nn.functional.cross_entropy(logits, lab))
            all_logits.append(logits)
        elif plan.task == Task.CAUSAL_LM:
            logits = out.logits[:, :-1, :]
            target = lab[:, 1:]
            losses.append(
                nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
            )
        else:
            logits = head_logits(plan, out.last_hidden_state, mask, row)
            losses.append(nn.functional.cross_entropy(logits, lab))
            all_logits.append(logits)
    loss = torch.stack(losses).numpy()
    return loss, (torch.stack(all_logits).numpy() if all_logits else None)
