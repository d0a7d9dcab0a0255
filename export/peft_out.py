"""`fwdllm export-peft`: a trained θ back into the Hugging Face ecosystem.

- LoRA: a peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) for
  the frozen base model; ``--merged``: the base model with B·A·alpha/r merged into its weights.
- BitFit and head: peft has no adapter type for "biases only", so a merged checkpoint (the
  base model's ``save_pretrained`` with θ's biases in place).
- Adapter (bottleneck): neither peft nor a merge can express it (it is non-linear), so the
  folder holds ``adapter_model.safetensors`` keyed by θ's names plus ``fwdllm_adapter.json``
  stating the formula h + up(relu(down(h))) on each named Linear's output.
- seq-cls always adds ``classifier.safetensors`` (``weight`` [C, H], ``bias`` [C]) and
  ``fwdllm_head.json``: logits = Linear(mean of the last hidden states over attention_mask).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from fwdllm.errors import UserError
from fwdllm.proto.manifest import load_manifest
from fwdllm.proto.names import Task


def load_trained_theta(path: Path, manifest) -> np.ndarray:
    """θ from a safetensors file in the bundle's layout, flattened; a clear error when the file is missing."""
    from safetensors.numpy import load_file

    if not path.is_file():
        raise UserError(
            f"--theta {path}: no such file; pass a θ safetensors file (e.g. "
            "a coordinator checkpoint or the bundle's theta.safetensors)"
        )
    return manifest.theta.flatten(load_file(str(path)))


def export_peft(bundle: Path, theta_file: Path, out: Path, merged: bool = False) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    from fwdllm.export.materialize import materialize
    from fwdllm.export.models import load, resolve
    from fwdllm.export.plan import plan_from_manifest

    manifest = load_manifest(bundle)
    theta = load_trained_theta(Path(theta_file), manifest)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} already exists and is not empty; choose a new folder or delete it")
    method = manifest.peft.method
    if method == "adapter" and merged:
        raise UserError("bottleneck adapters are non-linear and cannot be merged into the weights; drop --merged")
    loaded = load(manifest.model.source, manifest.model.task)
    plan = plan_from_manifest(loaded.model, manifest)
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in manifest.theta.split(theta).items()}
    out.mkdir(parents=True, exist_ok=True)
    if method == "lora" and not merged:
        from peft import LoraConfig, get_peft_model

        sites = [s for s in plan.sites if s.kind == "lora"]
        r = int(sites[0].tensors[0][1].shape[0])
        cfg = LoraConfig(
            r=r, lora_alpha=sites[0].options["scaling"] * r, target_modules=[s.path for s in sites], lora_dropout=0.0
        )
        model = get_peft_model(loaded.model, cfg)
        model.base_model.model.name_or_path = str(resolve(manifest.model.source)[0])
        for site in sites:
            mod = model.base_model.model.get_submodule(site.path)
            a, b = (tensors[n] for n in site.names())
            mod.lora_A["default"].weight.data.copy_(a)
            mod.lora_B["default"].weight.data.copy_(b)
        model.peft_config["default"].base_model_name_or_path = str(resolve(manifest.model.source)[0])
        model.save_pretrained(str(out))
    elif method == "adapter":
        names = [n for s in plan.sites if s.kind == "adapter" for n in s.names()]
        save_file({n: tensors[n].contiguous() for n in names}, str(out / "adapter_model.safetensors"))
        (out / "fwdllm_adapter.json").write_text(
            json.dumps(
                {
                    "base_model": str(resolve(manifest.model.source)[0]),
                    "formula": "y = h + up(relu(down(h))), h = output of the named Linear, before the residual",
                    "modules": sorted({s.path for s in plan.sites if s.kind == "adapter"}),
                    "tensors": "<module>.adapter.{down,up}.{weight,bias}; down [H/reduction, H], up [H, H/reduction]",
                },
                indent=2,
            )
            + "\n"
        )
    else:
        model = materialize(loaded.model, plan, theta)
        if method == "lora":
            from peft.tuners.tuners_utils import BaseTunerLayer

            for mod in model.modules():
                if isinstance(mod, BaseTunerLayer):
                    mod.merge()
            model = _unwrap_lora(model)
        model.save_pretrained(str(out))
        shutil.copyfile(loaded.tokenizer_file, out / "tokenizer.json")
    if manifest.model.task == Task.SEQ_CLS:
        save_file(
            {"weight": tensors["classifier.weight"].contiguous(), "bias": tensors["classifier.bias"].contiguous()},
            str(out / "classifier.safetensors"),
        )
        (out / "fwdllm_head.json").write_text(
            json.dumps(
                {
                    "pooling": "mean over tokens with attention_mask = 1 of the last hidden states",
                    "head": "logits = pooled @ weight.T + bias (classifier.safetensors)",
                    "num_labels": manifest.model.num_labels,
                    "labels": manifest.model.labels,
                },
                indent=2,
            )
            + "\n"
        )
    return [p for p in out.iterdir()]


def _unwrap_lora(model):
    """Replace merged peft LoRA layers by their base Linear, so save_pretrained writes plain weights."""
    from peft.tuners.lora import LoraLayer

    for name, mod in list(model.named_modules()):
        if isinstance(mod, LoraLayer):
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, leaf, mod.get_base_layer())
    return model
