"""`fwdllm export-peft`: a trained θ back into the Hugging Face ecosystem.

- Encoder classifiers (seq-cls) become ``AutoModelForSequenceClassification`` folders with fwdllm's
  mean-pooling head as modeling code (hf_classifier.py). LoRA: the folder holds the frozen base with the
  bundle's initial head plus a peft ``SEQ_CLS`` adapter (LoRA and the trained ``classifier`` in
  ``modules_to_save``), which transformers applies when it loads the folder; ``--merged``, BitFit and
  head: the trained model itself.
- Decoders: LoRA as a peft ``CAUSAL_LM`` adapter for the base model; ``--merged`` and BitFit as the base
  model's ``save_pretrained`` with θ merged in.
- Bottleneck adapters: neither peft nor a merge can express them (they are non-linear), so the folder
  holds ``adapter_model.safetensors`` keyed by θ's names plus ``fwdllm_adapter.json`` stating the formula
  h + up(relu(down(h))), and for seq-cls ``classifier.safetensors`` with ``fwdllm_head.json``.

Every folder names the base model by its public name and carries a filled model card (model_card.py).
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


def export_peft(
    bundle: Path, theta_file: Path, out: Path, merged: bool = False, hub_id: str | None = None
) -> list[Path]:
    """``hub_id``: the Hub repository OUT will be uploaded to. A classifier's LoRA adapter then names it as its
    base model (the folder holds that base), so loading the repository by name gives base and adapter."""
    import torch

    from fwdllm.export.model_card import RunInfo, model_card, public_name
    from fwdllm.export.models import load
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
    base = public_name(manifest.model.source)
    out.mkdir(parents=True, exist_ok=True)
    if method == "adapter":
        files, usage, library = _bottleneck(plan, tensors, out, base, manifest)
    elif manifest.model.task == Task.SEQ_CLS:
        files, usage, library = _classifier(loaded, plan, theta, tensors, out, base, manifest, merged, hub_id)
    else:
        files, usage, library = _decoder(loaded, plan, theta, tensors, out, base, merged)
    usage = usage.replace('"DIR', f'"{hub_id}' if hub_id else '"DIR')
    (out / "README.md").write_text(model_card(manifest, base, files, usage, RunInfo.beside(Path(theta_file)), library))
    return sorted(out.iterdir())


def _lora_config(plan, **extra):
    from peft import LoraConfig

    sites = [s for s in plan.sites if s.kind == "lora"]
    r = int(sites[0].tensors[0][1].shape[0])
    cfg = LoraConfig(
        r=r,
        lora_alpha=sites[0].options["scaling"] * r,
        target_modules=[s.path for s in sites],
        lora_dropout=0.0,
        **extra,
    )
    return cfg, sites


def _set_lora(model, sites, tensors) -> None:
    """Copy θ's A and B into a peft model's LoRA layers (``model`` is the model under ``base_model.model``)."""
    for site in sites:
        mod = next(m for p, m in model.named_modules() if p == site.path or p.endswith("." + site.path))
        a, b = (tensors[n] for n in site.names())
        mod.lora_A["default"].weight.data.copy_(a)
        mod.lora_B["default"].weight.data.copy_(b)


def _classifier(loaded, plan, theta, tensors, out, base, manifest, merged, hub_id):
    from fwdllm.export.hf_classifier import classifier_model, label_names, save_classifier

    labels = label_names(manifest)
    head_names = ("classifier.weight", "classifier.bias")
    trained = {n: tensors[n] for n in head_names}
    load_line = 'model = AutoModelForSequenceClassification.from_pretrained("DIR", trust_remote_code=True)\n'
    if manifest.peft.method == "lora" and not merged:
        from peft import get_peft_model

        initial = {n: t for site in plan.sites if site.kind == "head" for n, (_, t) in zip(site.names(), site.tensors)}
        model = classifier_model(loaded.model, labels, initial, base)
        save_classifier(model, out, loaded.folder, base)
        cfg, sites = _lora_config(plan, task_type="SEQ_CLS", modules_to_save=["classifier"])
        peft_model = get_peft_model(model, cfg)
        _set_lora(peft_model.base_model.model, sites, tensors)
        saved = peft_model.base_model.model.classifier.modules_to_save["default"]
        saved.weight.data.copy_(trained["classifier.weight"])
        saved.bias.data.copy_(trained["classifier.bias"])
        peft_model.peft_config["default"].base_model_name_or_path = hub_id or base
        peft_model.peft_config["default"].modules_to_save = ["classifier"]  # peft adds its defaults ("score")
        peft_model.save_pretrained(str(out))
        files = (
            f"The frozen encoder of `{base}` with fwdllm's mean-pooling classifier (`modeling_fwdllm.py`, "
            "`config.json`, `model.safetensors`: the head as the bundle started it) and the trained peft LoRA "
            "adapter (`adapter_config.json`, `adapter_model.safetensors`: LoRA on the encoder, the trained "
            "`classifier` in `modules_to_save`). transformers applies the adapter when it loads the folder."
        )
        usage = (
            "from transformers import AutoModelForSequenceClassification, pipeline\n\n"
            + load_line
            + "# or\n"
            + 'classify = pipeline("text-classification", model="DIR", trust_remote_code=True)\n\n'
            + "# or the adapter with peft over the published base weights, in this folder's class:\n"
            + "from peft import PeftModel\nfrom transformers import AutoConfig\n"
            + "from transformers.dynamic_module_utils import get_class_from_dynamic_module\n\n"
            + 'config = AutoConfig.from_pretrained("DIR", trust_remote_code=True)\n'
            + 'cls = get_class_from_dynamic_module(config.auto_map["AutoModelForSequenceClassification"], "DIR")\n'
            + f'model = PeftModel.from_pretrained(cls.from_pretrained("{base}", config=config), "DIR")\n'
        )
        if not hub_id:
            files += (
                " To load it by name from the Hub (AutoPeftModelForSequenceClassification too), export it with "
                "`--hub-id REPO` and upload the folder to REPO: the adapter then names REPO as its base model."
            )
        else:
            usage += (
                "\n# or\nfrom peft import AutoPeftModelForSequenceClassification\n\n"
                'model = AutoPeftModelForSequenceClassification.from_pretrained("DIR", trust_remote_code=True)\n'
            )
        return files, usage, "transformers"
    from fwdllm.export.materialize import merged as with_theta

    encoder = with_theta(loaded.model, plan, theta)
    save_classifier(classifier_model(encoder, labels, trained, base), out, loaded.folder, base)
    files = (
        f"`{base}` with the trained θ in its weights and fwdllm's mean-pooling classifier "
        "(`modeling_fwdllm.py`, named in `config.json`'s `auto_map`), a complete "
        "`AutoModelForSequenceClassification` checkpoint."
    )
    usage = (
        "from transformers import AutoModelForSequenceClassification, pipeline\n\n"
        'classify = pipeline("text-classification", model="DIR", trust_remote_code=True)\n'
        "# or\n" + load_line
    )
    return files, usage, "transformers"


def _decoder(loaded, plan, theta, tensors, out, base, merged):
    if any(s.kind == "lora" for s in plan.sites) and not merged:
        from peft import get_peft_model

        cfg, sites = _lora_config(plan, task_type="CAUSAL_LM")
        model = get_peft_model(loaded.model, cfg)
        _set_lora(model.base_model.model, sites, tensors)
        model.peft_config["default"].base_model_name_or_path = base
        model.save_pretrained(str(out))
        files = f"A peft LoRA adapter for `{base}` (`adapter_config.json`, `adapter_model.safetensors`)."
        usage = 'from peft import AutoPeftModelForCausalLM\n\nmodel = AutoPeftModelForCausalLM.from_pretrained("DIR")\n'
        return files, usage, "peft"
    from fwdllm.export.materialize import merged as with_theta

    model = with_theta(loaded.model, plan, theta)
    model.save_pretrained(str(out))
    shutil.copyfile(loaded.tokenizer_file, out / "tokenizer.json")
    files = (
        f"`{base}` with the trained θ merged into its weights (`config.json`, `model.safetensors`, `tokenizer.json`)."
    )
    usage = 'from transformers import AutoModelForCausalLM\n\nmodel = AutoModelForCausalLM.from_pretrained("DIR")\n'
    return files, usage, "transformers"


def _bottleneck(plan, tensors, out, base, manifest):
    from safetensors.torch import save_file

    names = [n for s in plan.sites if s.kind == "adapter" for n in s.names()]
    save_file({n: tensors[n].contiguous() for n in names}, str(out / "adapter_model.safetensors"))
    (out / "fwdllm_adapter.json").write_text(
        json.dumps(
            {
                "base_model": base,
                "formula": "y = h + up(relu(down(h))), h = output of the named Linear, before the residual",
                "modules": sorted({s.path for s in plan.sites if s.kind == "adapter"}),
                "tensors": "<module>.adapter.{down,up}.{weight,bias}; down [H/reduction, H], up [H, H/reduction]",
            },
            indent=2,
        )
        + "\n"
    )
    files = (
        "Bottleneck adapters (`adapter_model.safetensors`, keyed by module path; `fwdllm_adapter.json` gives the "
        "formula h + up(relu(down(h))) on each named Linear's output), which no peft adapter type expresses."
    )
    usage = (
        "import json, torch\nfrom safetensors.torch import load_file\nfrom transformers import AutoModel\n\n"
        f'model = AutoModel.from_pretrained("{base}")\n'
        'doc, t = json.load(open("DIR/fwdllm_adapter.json")), load_file("DIR/adapter_model.safetensors")\n'
        'for path in doc["modules"]:\n'
        '    w = [t[f"{path}.adapter.{k}"] for k in ("down.weight", "down.bias", "up.weight", "up.bias")]\n'
        "    model.get_submodule(path).register_forward_hook(\n"
        "        lambda m, i, h, w=w: h + torch.relu(h @ w[0].T + w[1]) @ w[2].T + w[3])\n"
    )
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
        files += " The classifier: `classifier.safetensors`, logits = mean-pooled last hidden states @ weight.T + bias."
    return files, usage, "transformers"
