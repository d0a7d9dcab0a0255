"""`fwdllm export-peft --format gguf`: a trained decoder θ as a llama.cpp LoRA adapter.

The adapter is the file the llama.cpp backend writes for every perturbation (proto/gguf_lora.py),
here written once for θ and named for the whole model (blocks counted from 0), so stock
llama.cpp applies it to the bundle's base GGUF: ``llama-cli -m BASE.gguf --lora adapter.gguf``,
or ``Llama(model_path=BASE.gguf, lora_path="adapter.gguf")`` in llama-cpp-python. The heads
and the architecture come from the base GGUF itself, so the adapter matches what loads it.
"""

from __future__ import annotations

import json
from pathlib import Path

from fwdllm.errors import UserError
from fwdllm.export.model_card import RunInfo, model_card, public_name
from fwdllm.export.peft_out import load_trained_theta
from fwdllm.proto.gguf_lora import LoraAdapterWriter, lora_alpha
from fwdllm.proto.manifest import load_manifest
from fwdllm.proto.names import GraphFormat, GraphRole, Task

ADAPTER_FILE = "adapter.gguf"
LABELS_FILE = "fwdllm_labels.json"


def export_llama_adapter(bundle: Path, theta_file: Path, out: Path) -> list[Path]:
    """Write OUT/adapter.gguf (+ the label words and a README); returns the files written."""
    import gguf

    manifest = load_manifest(bundle)
    if manifest.model.task != Task.CAUSAL_LM or manifest.peft.method != "lora":
        raise UserError(
            f"--format gguf writes a llama.cpp LoRA adapter, which needs a causal-lm LoRA bundle; "
            f"this one is {manifest.model.task} {manifest.peft.method}"
        )
    bases = [g for g in manifest.graphs if g.format == GraphFormat.GGUF and g.role == GraphRole.BASE]
    if not bases:
        raise UserError(f"{bundle} has no GGUF base model for the adapter to apply to; re-export it with --format gguf")
    theta = load_trained_theta(Path(theta_file), manifest)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} already exists and is not empty; choose a new folder or delete it")
    fields = gguf.GGUFReader(str(bundle / bases[0].file)).fields
    arch = str(fields["general.architecture"].contents())
    writer = LoraAdapterWriter(
        manifest.theta,
        lora_alpha(manifest.peft.config),
        int(fields[f"{arch}.attention.head_count"].contents()),
        int(fields[f"{arch}.attention.head_count_kv"].contents()),
        arch,
    )
    out.mkdir(parents=True, exist_ok=True)
    written = [writer.write(out / ADAPTER_FILE, theta)]
    labels = manifest.model.labels or []
    if manifest.model.label_token_ids:
        (out / LABELS_FILE).write_text(
            json.dumps({"labels": labels, "token_ids": manifest.model.label_token_ids}, indent=2) + "\n"
        )
        written.append(out / LABELS_FILE)
    base = public_name(manifest.model.source)
    card = model_card(
        manifest,
        base,
        _files(base, [Path(b.file).name for b in bases], labels),
        _usage(Path(bases[0].file).name),
        RunInfo.beside(Path(theta_file)),
        "llama.cpp",
    )
    (out / "README.md").write_text(card)
    written.append(out / "README.md")
    return written


def _files(base: str, bases: list[str], labels: list[str]) -> str:
    words = ", ".join(f"' {w}'" for w in labels)
    scoring = (
        f" The model answers with one of the label words {words}: after the prompt, the label is the word whose "
        f"first token (ids in `{LABELS_FILE}`) has the largest logit."
        if labels
        else ""
    )
    return (
        f"A llama.cpp LoRA adapter (`{ADAPTER_FILE}`) for the fwdllm bundle's GGUF of `{base}` "
        f"({', '.join(bases)}): its tensors are named and shaped for that file.{scoring}"
    )


def _usage(base_file: str) -> str:
    return (
        f"# llama-cli -m {base_file} --lora {ADAPTER_FILE}\n"
        "from llama_cpp import Llama\n\n"
        f'llm = Llama(model_path="{base_file}", lora_path="DIR/{ADAPTER_FILE}")\n'
    )
