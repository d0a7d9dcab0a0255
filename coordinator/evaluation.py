"""Held-out evaluation of theta on the coordinator, through a local device backend.

The coordinator accepts any callable ``theta -> {metric: value}``; this module builds the
standard one from the ``[eval]`` config: held-out examples in the devices' JSONL format,
evaluated with ``fwdllm.device_runtime.backend.open_backend`` (seq-cls and label-word decoders:
held-out loss and accuracy from the label logits; open-ended causal-lm: held-out loss, and
where every held-out target is one token, restricted-choice accuracy over those tokens).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from fwdllm.coordinator.config import EvalConfig
from fwdllm.device_runtime.backend import DEFAULT_BACKEND
from fwdllm.errors import UserError


class BackendEvaluator:
    def __init__(self, bundle: Path, data: Path, backend: str = DEFAULT_BACKEND, batch_size: int = 32, limit: int = 0):
        from fwdllm.device_runtime.backend import open_backend
        from fwdllm.device_runtime.examples import load_examples

        self.backend = open_backend(bundle, backend, options={"threads": 1})
        manifest = self.backend.manifest
        examples = load_examples(data, manifest)
        self.examples = examples[:limit] if limit else examples
        fixed = self.backend.batch_size
        self.batch_size = fixed or batch_size
        # Restricted choice needs a backend whose causal-lm logits are next-token logits. The candidates come from
        # the whole held-out file, so a --limit prefix missing a label still chooses among all of them.
        self.classifies = manifest.model.classifies
        next_token = not self.classifies and self.backend.next_token_logits
        self.choices = single_token_targets(self.backend.tokenizer(), examples) if next_token else None
        if self.choices is not None:
            self.choices = (self.choices[0], self.choices[1][: len(self.examples)])

    def __call__(self, theta: np.ndarray) -> dict:
        if self.choices is not None:
            return self._choice(theta, self.choices)
        tok = self.backend.tokenizer()
        losses, weights, correct = [], [], 0
        starts = range(0, len(self.examples), self.batch_size)
        for start in tqdm(starts, desc="evaluate", leave=False, disable=len(starts) < 20):
            chunk = self.examples[start : start + self.batch_size]
            batch = tok.batch(chunk)
            if self.backend.batch_size and batch.size < self.backend.batch_size:
                batch = batch.rows(0, batch.size, pad_to=self.backend.batch_size)
            if self.classifies:
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
        if self.classifies:
            out["accuracy"] = correct / len(self.examples)
        return out

    def _choice(self, theta: np.ndarray, choices: tuple[np.ndarray, np.ndarray]) -> dict:
        """A single-token-target task from one pass over the prompts: the next-token logits
        after each prompt give the target's cross-entropy (the causal-lm loss) and the
        restricted-choice prediction."""
        from fwdllm.device_runtime.examples import Example

        tok, (candidates, targets) = self.backend.tokenizer(), choices
        rows: list[np.ndarray] = []
        starts = range(0, len(self.examples), self.batch_size)
        for start in tqdm(starts, desc="evaluate", leave=False, disable=len(starts) < 20):
            chunk = [Example(prompt=e.prompt) for e in self.examples[start : start + self.batch_size]]
            batch = tok.batch(chunk)
            if self.backend.batch_size and batch.size < self.backend.batch_size:
                batch = batch.rows(0, batch.size, pad_to=self.backend.batch_size)
            rows.append(np.asarray(self.backend.logits(batch, theta), dtype=np.float64)[: len(chunk)])
        logits = np.concatenate(rows)
        shifted = logits - logits.max(axis=1, keepdims=True)
        nll = np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(len(targets)), targets]
        return {
            "eval_loss": float(nll.mean()),
            "accuracy": choice_accuracy(logits, candidates, targets),
            "eval_examples": len(self.examples),
        }


def single_token_targets(tok, examples) -> tuple[np.ndarray, np.ndarray] | None:
    """(candidate token ids, each example's target id) when every target is one token and
    there are at least two distinct ones; else None (free text: no accuracy)."""
    from fwdllm.device_runtime.examples import IGNORE_INDEX, Example

    ids = []
    for start in range(0, len(examples), 256):
        labels = tok.batch([Example(target=e.target) for e in examples[start : start + 256]]).labels
        for row in labels:
            row = row[row != IGNORE_INDEX]
            if row.size != 1:
                return None
            ids.append(int(row[0]))
    targets = np.array(ids, dtype=np.int64)
    candidates = np.unique(targets)
    return (candidates, targets) if candidates.size >= 2 else None


def choice_accuracy(logits: np.ndarray, candidates: np.ndarray, targets: np.ndarray) -> float:
    """Share of rows whose highest logit among the ``candidates`` token ids is the target's."""
    picked = candidates[np.asarray(logits)[:, candidates].argmax(axis=1)]
    return float((picked == targets).mean())


def evaluator_from_config(cfg: EvalConfig, bundle: Path):
    """The configured evaluator, or None when evaluation is off."""
    if cfg.every <= 0:
        return None
    if not cfg.data:
        raise UserError(
            "eval.every is set but eval.data is empty; name a held-out JSONL file (`fwdllm data partition`)"
        )
    return BackendEvaluator(Path(bundle), Path(cfg.data), cfg.backend, cfg.batch_size, cfg.limit)
