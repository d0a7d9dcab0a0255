"""The model a backprop baseline trains: the exporter's PEFT sites and θ layout with θ as a leaf tensor,
FedAdapter's progressive growth, and label-word prompts encoded by the devices' own tokenizer."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from fwdllm.errors import UserError
from fwdllm.proto.names import Task

if TYPE_CHECKING:
    from fwdllm.device_runtime.backend import Tokenizer

FEDADAPTER_WIDTHS = (8, 16, 32)  # bottleneck sizes of the stages; depths are 1/3, 2/3 and all of the layers


class TrainableModel:
    """The exporter's perturbable model with θ (and, for full fine-tuning, every weight) trainable."""

    def __init__(
        self,
        model: str,
        peft: str,
        labels: list[str],
        seed: int,
        stage: tuple[int, int] | None = None,
        task: str = Task.SEQ_CLS,
        trainable_layers: str = "all",
        label_words: bool = False,
    ):
        """``stage``: fedadapter's (depth, width); None = the schedule's first stage. ``task`` causal-lm: a decoder
        trained on next tokens (labels unused), as bench/memory.py measures it, or with ``label_words`` on
        ``labels`` as the words it answers with."""
        from fwdllm.export import models
        from fwdllm.export.archs import spec_for
        from fwdllm.export.perturbable import PerturbableModel
        from fwdllm.export.pipeline import label_word_ids
        from fwdllm.export.plan import PeftOptions, build_plan

        loaded = models.load(model, task)
        self.task, self.label_words = task, label_words
        word_ids = label_word_ids(loaded.tokenizer_file, labels) if label_words else None
        # full fine-tuning keeps the smallest θ beside every weight: the head, or a decoder's (zero) BitFit biases
        full = "head" if task == Task.SEQ_CLS else "bitfit"
        options = PeftOptions(
            method={"full": full, "fedadapter": "adapter"}.get(peft, peft), trainable_layers=trainable_layers, seed=seed
        )
        self.stage: dict[str, int] = {}  # fedadapter: the depth and width of this model's adapters
        if peft == "fedadapter":
            spec = spec_for(loaded.model.config.model_type)
            self.schedule = fedadapter_schedule(spec.num_layers(loaded.model))
            depth, width = stage or self.schedule[0]
            hidden = spec.hidden_size(loaded.model.config)
            if hidden % width:
                raise UserError(
                    f"fedadapter width {width} does not divide the hidden size {hidden}; use a divisor of {hidden}"
                )
            options.trainable_layers, options.adapter_reduction = f"top:{depth}", hidden // width
            self.stage = {"depth": depth, "width": width}
        plan = build_plan(loaded.model, task, len(labels) if task == Task.SEQ_CLS else None, options, word_ids)
        self.pm = PerturbableModel(loaded.model, plan)
        self.layout = plan.layout
        self.theta = torch.nn.Parameter(plan.theta0().unsqueeze(0))
        self.params = [self.theta]
        if peft == "full":  # every weight the stages run (an unused pooler stays out: it would upload zeros)
            stages = plan.spec.stage_modules(self.pm.model)
            weights = {id(p): p for roots in stages for root in roots for p in root.parameters()}
            for p in weights.values():
                p.requires_grad_(True)
            self.params += list(weights.values())
        self.num_trainable = sum(p.numel() for p in self.params)
        # the layers below the first trainable one stay as loaded (not with full fine-tuning, nor as fedadapter grows)
        self.frozen_prefix = label_words and peft not in ("full", "fedadapter") and plan.cut_layer is not None
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(loaded.tokenizer_file.parent))
        # word_ids is set exactly when label_words is
        self._prompts = PromptEncoder(loaded, plan, options, labels, word_ids) if word_ids is not None else None

    def encode(self, texts: list[str], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts, or with label words their prompts, as ``seq_len`` token ids and mask (right padding)."""
        if self._prompts is not None:
            return self._prompts(texts, seq_len)
        enc = self.tokenizer(texts, truncation=True, max_length=seq_len, padding="max_length", return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def loss_logits(
        self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, hidden: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden``: what the frozen layers give for ``ids`` (``self.pm.prefix``); only the layers above then run."""
        if hidden is None:
            out = self.pm.full(ids, mask, labels, self.theta)  # (loss, logits); causal-lm: (loss,)
        else:
            out = self.pm.suffix(hidden, mask, labels, self.theta)
        return out[0][0], (out[1][0] if len(out) > 1 else None)

    def state(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    def load(self, values: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, v in zip(self.params, values):
                p.copy_(v)


def fedadapter_schedule(num_layers: int) -> list[tuple[int, int]]:
    """FedAdapter's (depth, width) per stage: adapters on the top third, two thirds, then all layers."""
    n = len(FEDADAPTER_WIDTHS)
    return [(max(1, round(num_layers * (i + 1) / n)), width) for i, width in enumerate(FEDADAPTER_WIDTHS)]


def grow(old: TrainableModel, model: str, labels: list[str], seed: int, stage: tuple[int, int]) -> TrainableModel:
    """The fedadapter model of ``stage``, computing the same function as ``old``.

    Each tensor of ``old`` fills the leading corner of its new tensor: a wider adapter keeps its down
    rows and up columns, its extra down rows start as the adapter method initialises them and its
    extra up columns at zero; a newly adapted layer has up = 0; the head is kept. So the extra
    values change nothing until they are trained.
    """
    new = TrainableModel(model, "fedadapter", labels, seed, stage, task=old.task, label_words=old.label_words)
    values = new.layout.split(new.theta.detach()[0].numpy().copy())
    for name, value in old.layout.split(old.theta.detach()[0].numpy()).items():
        values[name][tuple(slice(0, n) for n in value.shape)] = value
    new.load([torch.from_numpy(new.layout.flatten(values)).unsqueeze(0)])
    return new


class PromptEncoder:
    """Label-word prompts encoded by the devices' tokenizer (``fwdllm.device_runtime.backend.Tokenizer``) from the
    model info an export writes: right padding, and truncation that cuts a long prompt's start, keeping the end where
    the answer is scored. Sharing the code, not copying it, keeps a baseline's token ids equal to a device's."""

    def __init__(self, loaded, plan, options, labels: list[str], word_ids: list[int]):
        from fwdllm.proto.manifest import ModelInfo, PeftInfo

        self.info = ModelInfo(
            source=loaded.source,
            architecture=plan.spec.name,
            task=Task.CAUSAL_LM,
            max_seq_len=0,
            tokenizer=loaded.tokenizer_file.name,
            num_labels=len(labels),
            labels=list(labels),
            pad_token_id=getattr(loaded.config, "pad_token_id", None),
            label_token_ids=list(word_ids),
        )
        self.peft = PeftInfo(method=options.method, trainable_layers=options.trainable_layers, config=options.config())
        self.folder, self.layout = loaded.tokenizer_file.parent, plan.layout
        self.tokenizers: dict[int, Tokenizer] = {}  # seq_len -> Tokenizer (each reads tokenizer.json once)

    def __call__(self, prompts: list[str], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        from dataclasses import replace

        from fwdllm.device_runtime.backend import Tokenizer
        from fwdllm.device_runtime.examples import Example
        from fwdllm.proto.manifest import Manifest

        if seq_len not in self.tokenizers:  # the manifest of a bundle exported with --seq-len seq_len, less its graphs
            manifest = Manifest(
                model=replace(self.info, max_seq_len=seq_len), peft=self.peft, theta=self.layout, graphs=[]
            )
            self.tokenizers[seq_len] = Tokenizer(self.folder, manifest)
        batch = self.tokenizers[seq_len].batch([Example(prompt=p) for p in prompts])
        return torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask)


class EncodedExamples:
    """Token ids of a list of examples, encoded once.

    Label-word batches are cut to their longest row, as devices with a dynamic sequence axis feed them: a
    decoder's right padding changes nothing before it, and the prompts are much shorter than ``seq_len``.
    """

    def __init__(self, model: TrainableModel, examples: list[dict], labels: list[str], seq_len: int):
        key = "prompt" if model.label_words else "text"
        self.ids, self.mask = model.encode([e[key] for e in examples], seq_len)
        self.trim = model.label_words
        index = {name: i for i, name in enumerate(labels)}
        self.labels = torch.tensor([index[e["label"]] for e in examples], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, rows: np.ndarray):
        rows = torch.as_tensor(rows)
        ids, mask = self.ids[rows], self.mask[rows]
        if self.trim:
            width = int(mask.sum(1).max())
            ids, mask = ids[:, :width], mask[:, :width]
        return ids, mask, self.labels[rows]
