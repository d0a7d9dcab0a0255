"""LoRA (Hu et al.): y = W x + b + (alpha / r) · B A x on the target Linears; FwdLLM's default r=8, alpha=16 on
query/value.

Initialised as peft does (A Kaiming-uniform, B zero), or from an existing peft adapter.
"""

import math

import torch
from torch import nn

from fwdllm.errors import UserError
from fwdllm.export.methods import Site, matches


def METHOD(model, spec, modules, options):
    r, alpha = int(options["lora_r"]), float(options["lora_alpha"])
    if r < 1:
        raise UserError(f"--lora-r must be at least 1, got {r}")
    targets = options["lora_targets"] or spec.lora_targets
    gen = torch.Generator().manual_seed(int(options.get("seed", 0)))
    sites = []
    for path, module in modules:
        if isinstance(module, nn.Linear) and any(matches(path, t) for t in targets):
            bound = 1.0 / math.sqrt(module.in_features)  # kaiming_uniform_(a=sqrt(5)), as peft
            a = (torch.rand(r, module.in_features, generator=gen) * 2 - 1) * bound
            b = torch.zeros(module.out_features, r)
            sites.append(Site(path, "lora", [("lora_A.weight", a), ("lora_B.weight", b)], {"scaling": alpha / r}))
    if not sites:
        linears = sorted({p.rsplit(".", 1)[-1] for p, m in modules if isinstance(m, nn.Linear)})
        raise UserError(
            f"--lora-targets {','.join(targets)} match no Linear layer in the trainable layers; "
            f"this {spec.name} model's Linear names are {linears}"
        )
    return sites
