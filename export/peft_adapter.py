"""Bottleneck adapters (Houlsby et al.; FwdLLM's default for DistilBERT): h + up(relu(down(h))) on the
output of the attention output projection and of the FFN output projection, before the residual.

Bottleneck size = hidden / reduction (default 16). down ~ N(0, 0.01²), up and biases zero, so
the adapted model starts equal to the frozen one.
"""

import torch
from torch import nn

from fwdllm.errors import UserError
from fwdllm.export.methods import Site, matches


def METHOD(model, spec, modules, options):
    reduction = int(options["adapter_reduction"])
    gen = torch.Generator().manual_seed(int(options.get("seed", 0)))
    sites = []
    for path, module in modules:
        if isinstance(module, nn.Linear) and (matches(path, spec.attention_output) or matches(path, spec.ffn_output)):
            h = module.out_features
            m = h // reduction
            if m < 1:
                raise UserError(
                    f"--adapter-reduction {reduction} leaves no bottleneck for hidden size {h}; use at most {h}"
                )
            tensors = [
                ("adapter.down.weight", torch.randn(m, h, generator=gen) * 0.01),
                ("adapter.down.bias", torch.zeros(m)),
                ("adapter.up.weight", torch.zeros(h, m)),
                ("adapter.up.bias", torch.zeros(h)),
            ]
            sites.append(Site(path, "adapter", tensors))
    return sites
