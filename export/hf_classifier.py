"""An encoder bundle's classifier as a Hugging Face ``AutoModelForSequenceClassification`` folder.

fwdllm's head mean-pools the last hidden states (export/BUNDLE.md), which no stock transformers class
does, so the folder carries its modeling code (``modeling_fwdllm.py``, a copy of hf_mean_pooling.py)
registered in ``config.json``'s ``auto_map``, with ``num_labels``, ``id2label`` and ``label2id`` in the
config: ``AutoModelForSequenceClassification`` and ``pipeline("text-classification")`` load it with
``trust_remote_code=True`` and compute the bundle's logits. The encoder sits under the attribute its
``*ForSequenceClassification`` class uses (``bert``, ``distilbert``, ...), so peft keys read as over
that class: ``base_model.model.bert.encoder.layer.5.attention.self.query.lora_A.weight``.
"""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fwdllm.errors import UserError
from fwdllm.export import hf_mean_pooling

MODELING_FILE = "modeling_fwdllm.py"


def _class_for(model_type: str) -> Any:
    for _, cls in inspect.getmembers(hf_mean_pooling, inspect.isclass):
        base_config = cls.__dict__.get("config_class")
        if base_config is not None and base_config.__mro__[1].model_type == model_type:
            return cls
    raise UserError(
        f"no Hugging Face classifier class for {model_type!r} encoders; export-peft writes it for bert, "
        "distilbert, albert and roberta"
    )


def label_names(manifest) -> list[str]:
    """The bundle's class names, or LABEL_i as transformers names unnamed classes."""
    return list(manifest.model.labels or [f"LABEL_{i}" for i in range(manifest.model.num_labels)])


def classifier_model(encoder: nn.Module, labels: list[str], head: dict[str, torch.Tensor], name: str) -> nn.Module:
    """The mean-pooling classifier over ``encoder`` (an ``AutoModel``, weights as they are) with the head
    ``{"classifier.weight", "classifier.bias"}``; ``name`` becomes the config's ``_name_or_path``."""
    cls = _class_for(encoder.config.model_type)
    fields = {k: v for k, v in encoder.config.to_dict().items() if k not in ("model_type", "architectures")}
    config = cls.config_class(**fields)
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    config.architectures = [cls.__name__]
    module = Path(MODELING_FILE).stem
    config.auto_map = {
        "AutoConfig": f"{module}.{cls.config_class.__name__}",
        "AutoModelForSequenceClassification": f"{module}.{cls.__name__}",
    }
    config.classifier_pooling = "mean"
    config.name_or_path = name
    model = cls(config).eval()
    missing, unexpected = getattr(model, cls.base_model_prefix).load_state_dict(encoder.state_dict(), strict=False)
    unexpected = [k for k in unexpected if not k.startswith("pooler.")]  # the CLS pooler the head does not use
    if missing or unexpected:
        raise UserError(
            f"the {encoder.config.model_type} encoder's weights do not fit its classifier class (missing "
            f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); export-peft cannot write this model"
        )
    with torch.no_grad():
        model.classifier.weight.copy_(head["classifier.weight"])
        model.classifier.bias.copy_(head["classifier.bias"])
    return model


def save_classifier(model: nn.Module, out: Path, tokenizer_folder: Path, name: str) -> None:
    """``save_pretrained`` plus the modeling code and the tokenizer, all naming the base as ``name``."""
    from transformers import PreTrainedTokenizerFast

    model.save_pretrained(str(out))
    shutil.copyfile(inspect.getfile(hf_mean_pooling), out / MODELING_FILE)
    # the checkpoint's tokenizer.json as it is, the file the bundle's devices tokenize with
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_folder))
    tokenizer.name_or_path = name
    tokenizer.save_pretrained(str(out))
