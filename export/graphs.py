"""The graph roles' signatures (BUNDLE.md "Graph contract") and sample inputs for tracing and validation."""

from __future__ import annotations

import numpy as np

from fwdllm.export.perturbable import Plan
from fwdllm.proto.manifest import TensorSpec
from fwdllm.proto.names import GraphRole

# Keyed by GraphRole members, looked up by plain role names too (a StrEnum member hashes as its value).
ROLE_INPUTS: dict[str, tuple[str, ...]] = {
    GraphRole.FULL: ("input_ids", "attention_mask", "labels", "theta"),
    GraphRole.PREFIX: ("input_ids", "attention_mask"),
    GraphRole.SUFFIX: ("hidden", "attention_mask", "labels", "theta"),
}


def roles(plan: Plan, cut: bool) -> list[str]:
    return list(ROLE_INPUTS) if cut and plan.cut_layer is not None else [GraphRole.FULL]


def outputs(plan: Plan, role: str) -> tuple[str, ...]:
    if role == GraphRole.PREFIX:
        return ("hidden",)
    return ("loss", "logits") if plan.classifies else ("loss",)


def tensor_specs(plan: Plan, role: str, hidden: int, int_dtype: str, fixed: dict[str, int] | None = None):
    """Inputs and outputs of a role; dims are the ``fixed`` ints (TFLite) or axis names (ONNX)."""
    f = fixed or {}
    B, S, P = f.get("B", "B"), f.get("S", "S"), f.get("P", "P")
    shapes: dict[str, tuple[list[int | str], str]] = {
        "input_ids": ([B, S], int_dtype),
        "attention_mask": ([B, S], int_dtype),
        "labels": ([B] if plan.classifies else [B, S], int_dtype),
        "theta": ([P, plan.layout.dim], "float32"),
        "hidden": ([B, S, hidden], "float32"),
        "loss": ([P], "float32"),
        "logits": ([P, B, plan.num_labels or 0], "float32"),  # only classifying plans have logits
    }
    ins = [TensorSpec(n, *shapes[n]) for n in ROLE_INPUTS[role]]
    outs = [TensorSpec(n, *shapes[n]) for n in outputs(plan, role)]
    return ins, outs


def sample_batch(plan: Plan, vocab: int, batch: int, seq: int, rows: int, theta0: np.ndarray, seed: int = 0):
    """A random batch with padding in the last row and θ = θ0 + 0.05·N(0,1) (P rows), for validation."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab, size=(batch, seq)).astype(np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    if batch > 1 and seq > 2:
        mask[-1, seq // 2 :] = 0
    if plan.classifies:
        labels = rng.integers(0, plan.num_labels, size=(batch,)).astype(np.int64)
    else:
        labels = np.where(mask == 1, ids, -100).astype(np.int64)
    theta = (theta0[None, :] + 0.05 * rng.standard_normal((rows, theta0.size))).astype(np.float32)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "theta": theta}


def errors(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> dict[str, float]:
    """Max absolute error per output and the scale-relative error max|got-want| / max|want| over all outputs."""
    out, rel = {}, 0.0
    for name, w in want.items():
        if w is None:
            continue
        diff = float(np.max(np.abs(np.asarray(got[name], dtype=np.float64) - w)))
        out[f"max_abs_err_{name}"] = diff
        rel = max(rel, diff / max(float(np.max(np.abs(w))), 1e-6))
    out["max_rel_err"] = rel
    return out
