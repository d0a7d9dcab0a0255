"""Held-out evaluation of theta on the coordinator, through a local device backend.

The coordinator accepts any callable ``theta -> {metric: value}``; this module builds the
standard one from the ``[eval]`` config: held-out examples in the devices' JSONL format,
evaluated with ``fwdllm.device_runtime.backend.open_backend`` (seq-cls: held-out loss and
accuracy from the logits; causal-lm: held-out loss).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from fwdllm.errors import UserError

from .config import EvalConfig


class BackendEvaluator:
    def __init__(self, bundle: Path, data: Path, backend: str = "onnxruntime", batch_size: int = 32, limit: int = 0):
        from fwdllm.device_runtime.backend import load_examples, open_backend

        self.backend = open_backend(bundle, backend, options={"threads": 1})
        manifest = self.backend.manifest
        examples = load_examples(data, manifest)
        self.examples = examples[:limit] if limit else examples
        self.task = manifest.model.task
        fixed = self.backend.batch_size
        self.batch_size = fixed or batch_size

    def __call__(self, theta: np.ndarray) -> dict:
        tok = self.backend.tokenizer()
        losses, weights, correct = [], [], 0
        starts = range(0, len(self.examples), self.batch_size)
        for start in tqdm(starts, desc="evaluate", leave=False, disable=len(starts) < 20):
            chunk = self.examples[start : start + self.batch_size]
            batch = tok.batch(chunk)
            if self.backend.batch_size and batch.size < self.backend.batch_size:
                batch = batch.rows(0, batch.size, pad_to=self.backend.batch_size)
            if self.task == "seq-cls":
                logits = np.asarray(self.backend.logits(batch, theta), dtype=np.float64)[: len(chunk)]
                labels = batch.labels[: len(chunk)]
                shifted = logits - logits.max(axis=1, keepdims=True)
                logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
                losses.append(float(-logp[np.arange(len(chunk)), labels].sum()))
                weights.append(len(chunk))
                correct += int((logits.argmax(axis=1) == labels).sum())
            else:
                loss = float(self.backend.losses(batch, theta[None, :])[0])
                losses.append(loss * batch.loss_weight())
                weights.append(batch.loss_weight())
        out = {"eval_loss": sum(losses) / max(1, sum(weights)), "eval_examples": len(self.examples)}
        if self.task == "seq-cls":
            out["accuracy"] = correct / len(self.examples)
        return out


def evaluator_from_config(cfg: EvalConfig, bundle: Path):
    """The configured evaluator, or None when evaluation is off."""
    if cfg.every <= 0:
        return None
    if not cfg.data:
        raise UserError("eval.every is set but eval.data is empty; name a held-out JSONL file (`fwdllm data partition`)")
    return BackendEvaluator(Path(bundle), Path(cfg.data), cfg.backend, cfg.batch_size, cfg.limit)
