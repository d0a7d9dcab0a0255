"""`fwdllm inspect`: a bundle's manifest as a short human-readable report."""

from __future__ import annotations

from pathlib import Path

from fwdllm.proto.manifest import Manifest
from fwdllm.proto.names import GraphRole, Task


def _shape(dims) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


def describe(m: Manifest, bundle: Path) -> str:
    mi, pi = m.model, m.peft
    lines = [
        f"bundle {bundle}  (schema {m.schema_version}, fwdllm {m.fwdllm_version}, {m.created})",
        f"fingerprint {m.fingerprint()[:16]}",
        f"model  {mi.source}: {mi.architecture}, {mi.num_layers} layers, "
        f"hidden {mi.hidden_size}, task {mi.task}, seq len {mi.max_seq_len}",
    ]
    if mi.task == Task.SEQ_CLS:
        lines.append(f"labels {mi.num_labels}" + (f": {', '.join(mi.labels)}" if mi.labels else ""))
    elif mi.label_token_ids:
        words = ", ".join(f"{w} ({t})" for w, t in zip(mi.labels or [], mi.label_token_ids))
        lines.append(f"labels {len(mi.label_token_ids)} words after the prompt (token ids): {words}")
    lines.append(f"peft   {pi.method}, trainable layers {pi.trainable_layers} {pi.config or ''}".rstrip())
    lines.append(f"theta  d = {m.theta.dim:,} float32 in {len(m.theta.tensors)} tensors ({m.theta_file})")
    for s in m.theta.tensors[:4]:
        lines.append(f"         {s.offset:>10,}  {s.name} {_shape(s.shape)}")
    if len(m.theta.tensors) > 4:
        lines.append(f"         ... {len(m.theta.tensors) - 4} more; `fwdllm inspect --json` lists all")
    if m.cut_layer is not None:
        lines.append(f"cut    prefix graphs run embeddings + {m.cut_layer} layers; suffix graphs take θ")
    lines.append("graphs")
    for g in m.graphs:
        size = (bundle / g.file).stat().st_size / 2**20 if (bundle / g.file).exists() else float("nan")
        sig = (
            ", ".join(f"{t.name}{_shape(t.shape)}" for t in g.inputs)
            + " -> "
            + ", ".join(f"{t.name}{_shape(t.shape)}" for t in g.outputs)
        )
        lines.append(
            f"  {g.format:6} {g.role:6} {g.precision:5} {g.file} ({size:.1f} MiB)"
            + (
                "  θ via " + g.theta_channel
                if any(t.name == "theta" for t in g.inputs) or g.role == GraphRole.BASE
                else ""
            )
        )
        if g.inputs:
            lines.append(f"         {sig}")
        # validation and delegation are free-form records of the export: shown as far as they hold what it writes
        v = g.validation
        if isinstance(v.get("max_rel_err"), (int, float)):
            lines.append(f"         validated: rel err {v['max_rel_err']:.2e} (tolerance {v.get('tolerance', '?')})")
        d = g.delegation
        if d:
            builtin = d.get("builtin")
            builtin = builtin if isinstance(builtin, dict) else {}
            left = ", ".join(f"{op}×{n}" for op, n in sorted(builtin.items(), key=str))
            lines.append(
                f"         XNNPACK takes {d.get('xnnpack', '?')} of {d.get('ops', '?')} ops in "
                f"{d.get('xnnpack_partitions', '?')} partition(s)" + (f"; builtin kernels run {left}" if left else "")
            )
    return "\n".join(lines)
