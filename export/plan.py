"""Decide what is trainable: PEFT sites, θ layout, initial θ and the cut layer."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fwdllm.errors import UserError
from fwdllm.export.archs import ArchSpec, spec_for
from fwdllm.export.methods import Site, methods, parse_trainable_layers
from fwdllm.export.perturbable import Plan
from fwdllm.proto.manifest import ThetaLayout
from fwdllm.proto.names import Task


@dataclass
class PeftOptions:
    method: str = "lora"
    trainable_layers: str = "all"
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=list)
    adapter_reduction: int = 16
    from_peft_adapter: str | None = None
    seed: int = 0

    def config(self) -> dict:
        if self.method == "lora":
            return {"r": self.lora_r, "alpha": self.lora_alpha, "targets": list(self.lora_targets)}
        if self.method == "adapter":
            return {
                "reduction": self.adapter_reduction,
                "activation": "relu",
                "placement": "attention-output,ffn-output",
            }
        return {}


def _stage_of(model: nn.Module, spec: ArchSpec) -> dict[int, int]:
    """id(module) -> the first stage that runs it."""
    owner: dict[int, int] = {}
    for stage, roots in enumerate(spec.stage_modules(model)):
        for root in roots:
            for m in root.modules():
                owner.setdefault(id(m), stage)
    return owner


def _apply_peft_adapter(folder: str, opts: PeftOptions) -> dict[str, torch.Tensor]:
    """Take r, alpha and targets from an existing peft LoRA adapter; return its tensors by module path."""
    d = Path(folder)
    cfg_file, weights = d / "adapter_config.json", d / "adapter_model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise UserError(
            f"--from-peft-adapter {folder}: needs adapter_config.json "
            "and adapter_model.safetensors (a peft save_pretrained folder)"
        )
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("peft_type") != "LORA":
        raise UserError(
            f"--from-peft-adapter {folder}: peft type {cfg.get('peft_type')!r} "
            "is not supported; only LORA adapters start a LoRA export"
        )
    opts.method = "lora"
    opts.lora_r, opts.lora_alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    targets = cfg.get("target_modules") or []
    opts.lora_targets = [targets] if isinstance(targets, str) else list(targets)
    from safetensors.torch import load_file

    return load_file(str(weights))


def adapter_labels(folder: str) -> list[str] | None:
    """The class names of a peft folder whose trained classifier an export keeps (``classifier_pooling: "mean"``
    and ``id2label`` in its config.json, as export-peft writes them), so a round trip needs no --labels."""
    cfg = Path(folder) / "config.json"
    doc = json.loads(cfg.read_text()) if cfg.is_file() else {}
    if doc.get("classifier_pooling") != "mean" or not doc.get("id2label"):
        return None
    return [doc["id2label"][str(i)] for i in range(len(doc["id2label"]))]


def _start_head(folder: str, tensors: dict[str, torch.Tensor], sites: list[Site], hf_prefix: str) -> None:
    """A seq-cls adapter's trained classifier (peft ``modules_to_save``) becomes the initial head; refused when
    the head would mean something else here (CLS pooling, another task) or other saved modules would be lost."""
    saved = json.loads((Path(folder) / "adapter_config.json").read_text()).get("modules_to_save") or []
    kept = [
        m
        for m in dict.fromkeys(saved)
        if any(_adapter_value(tensors, f"{m}.{p}", hf_prefix) is not None for p in ("weight", "bias"))
    ]
    if not kept:
        return
    head = next((s for s in sites if s.kind == "head"), None)
    if kept != ["classifier"] or head is None:
        raise UserError(
            f"--from-peft-adapter {folder}: its modules_to_save {kept} are trained weights fwdllm cannot "
            + ("start from" if head is not None else "use in a causal-lm bundle")
            + "; only a seq-cls classifier named 'classifier' is kept. Re-save the adapter without modules_to_save "
            "to start from its LoRA weights alone"
        )
    cfg = Path(folder) / "config.json"
    pooling = json.loads(cfg.read_text()).get("classifier_pooling") if cfg.is_file() else None
    if pooling != "mean":
        trained_on = f"{pooling!r} pooling" if pooling else "the CLS pooler (its config.json has no classifier_pooling)"
        raise UserError(
            f"--from-peft-adapter {folder}: its classifier was trained on {trained_on}, while fwdllm's head "
            "mean-pools the tokens; re-save the adapter without modules_to_save to start from its LoRA weights alone"
        )
    for i, (suffix, init) in enumerate(head.tensors):
        value = _adapter_value(tensors, suffix, hf_prefix)
        if value is None:
            raise UserError(
                f"--from-peft-adapter {folder}: its classifier has no {suffix} in adapter_model.safetensors"
            )
        if tuple(value.shape) != tuple(init.shape):
            raise UserError(
                f"--from-peft-adapter {folder}: its classifier has {value.shape[0]} classes, the export "
                f"{init.shape[0]}; pass --labels {value.shape[0]}"
            )
        head.tensors[i] = (suffix, value.float())


def _adapter_value(tensors: dict[str, torch.Tensor], name: str, hf_prefix: str) -> torch.Tensor | None:
    """Find ``path.lora_A.weight`` among peft's keys (``base_model.model.[prefix.]path.lora_A.weight``)."""
    for key, value in tensors.items():
        k = key.replace(".default", "")
        if k.endswith("." + name) or k == name:
            stem = k[: -len(name)].rstrip(".").split(".")
            if (
                stem[-2:] in (["base_model", "model"], ["model", hf_prefix])
                or stem[-1:] in (["model"], [hf_prefix])
                or stem == [""]
            ):
                return value
    return None


def build_plan(
    model: nn.Module, task: str, num_labels: int | None, opts: PeftOptions, label_token_ids: list[int] | None = None
) -> Plan:
    """``label_token_ids`` (causal-lm): the label words' token ids; the graphs then score those words at the
    answer position instead of next tokens over the whole vocabulary."""
    spec = spec_for(model.config.model_type)
    num_layers = spec.num_layers(model)
    start = _apply_peft_adapter(opts.from_peft_adapter, opts) if opts.from_peft_adapter else None
    if opts.method == "head" or opts.trainable_layers == "head":
        if task == Task.CAUSAL_LM:
            raise UserError("--task causal-lm has no classification head to train; choose --peft bitfit|adapter|lora")
        opts.method, opts.trainable_layers = "head", "head"
    table = methods()
    if opts.method not in table:
        raise UserError(f"--peft {opts.method!r} is not one of {sorted(table)}")
    if opts.method == "lora" and not opts.lora_targets:
        opts.lora_targets = list(spec.lora_targets)
    stages = set(parse_trainable_layers(opts.trainable_layers, num_layers))
    owner = _stage_of(model, spec)
    modules = [(p, m) for p, m in model.named_modules() if p and owner.get(id(m), -1) in stages]
    sites: list[Site] = table[opts.method](
        model,
        spec,
        modules,
        {
            "lora_r": opts.lora_r,
            "lora_alpha": opts.lora_alpha,
            "lora_targets": opts.lora_targets,
            "adapter_reduction": opts.adapter_reduction,
            "seed": opts.seed,
        },
    )
    if start is not None:
        for site in sites:
            for i, (suffix, init) in enumerate(site.tensors):
                value = _adapter_value(start, f"{site.path}.{suffix}", spec.hf_prefix)
                if value is None:
                    raise UserError(
                        f"--from-peft-adapter: no tensor for {site.path}.{suffix} in adapter_model.safetensors"
                    )
                if tuple(value.shape) != tuple(init.shape):
                    raise UserError(
                        f"--from-peft-adapter: {site.path}.{suffix} has shape "
                        f"{tuple(value.shape)}, the model needs {tuple(init.shape)}"
                    )
                site.tensors[i] = (suffix, value.float())
    modules_by_path = dict(model.named_modules())
    expand = min((owner[id(modules_by_path[s.path])] for s in sites), default=num_layers + 1)
    if task == Task.SEQ_CLS:
        if num_labels is None or num_labels < 2:
            raise UserError(
                f"a classifier needs at least 2 labels, got {num_labels}; pass --labels N (N >= 2) or --label-names a,b"
            )
        hidden = spec.hidden_size(model.config)
        sites.append(
            Site(
                "",
                "head",
                [("classifier.weight", torch.zeros(num_labels, hidden)), ("classifier.bias", torch.zeros(num_labels))],
            )
        )
    if start is not None:
        _start_head(str(opts.from_peft_adapter), start, sites, spec.hf_prefix)
    if not sites:
        raise UserError(
            f"--peft {opts.method} with --trainable-layers {opts.trainable_layers} leaves nothing trainable"
        )
    layout = ThetaLayout.from_shapes([(n, tuple(t.shape)) for s in sites for n, (_, t) in zip(s.names(), s.tensors)])
    if task == Task.CAUSAL_LM and label_token_ids:
        num_labels = len(label_token_ids)
    return Plan(
        spec,
        sites,
        layout,
        num_layers,
        expand,
        task,
        num_labels,
        tuple(label_token_ids) if task == Task.CAUSAL_LM and label_token_ids else None,
    )


def options_from_manifest(peft_info) -> PeftOptions:
    """The PeftOptions a bundle was exported with (its manifest's ``peft`` entry)."""
    cfg = peft_info.config
    opts = PeftOptions(method=peft_info.method, trainable_layers=peft_info.trainable_layers)
    if peft_info.method == "lora":
        opts.lora_r, opts.lora_alpha, opts.lora_targets = int(cfg["r"]), float(cfg["alpha"]), list(cfg["targets"])
    if peft_info.method == "adapter":
        opts.adapter_reduction = int(cfg["reduction"])
    return opts


def plan_from_manifest(model: nn.Module, manifest) -> Plan:
    """Rebuild a bundle's plan on its frozen model; fails when the model is not the one exported."""
    from fwdllm.proto.manifest import BundleError

    plan = build_plan(
        model,
        manifest.model.task,
        manifest.model.num_labels,
        options_from_manifest(manifest.peft),
        manifest.model.label_token_ids,
    )
    if plan.layout != manifest.theta:
        raise BundleError(
            f"the model at {manifest.model.source} does not give this bundle's θ layout; "
            "point the bundle's model source at the checkpoint it was exported from"
        )
    return plan
