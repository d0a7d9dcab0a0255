"""BitFit (Ben Zaken et al.; FwdLLM's default for BERT/ALBERT/RoBERTa): every bias of the chosen layers.

Covers Linear and LayerNorm biases. A Linear without a bias (Llama) gets a zero-initialised
one, as FwdLLM did for decoders; norms without a bias (RMSNorm) are left alone.
"""

import torch
from torch import nn

from fwdllm.export.methods import Site


def METHOD(model, spec, modules, options):
    sites = []
    for path, module in modules:
        if isinstance(module, (nn.Linear, nn.LayerNorm)):
            if module.bias is not None:
                init = module.bias.detach().clone()
            elif isinstance(module, nn.Linear):
                init = torch.zeros(module.out_features)
            else:
                continue
            sites.append(Site(path, "bias", [("bias", init)]))
    return sites
