"""fwdllm's Python API: the commands' work as functions, for notebooks and scripts.

Each function is what one `fwdllm` subcommand runs, with the same defaults and the same
errors (``fwdllm.errors.UserError`` and its subclasses name what is wrong and how to fix
it). Heavy libraries load only when a function needs them: ``import fwdllm`` stays light
enough for a phone, where only ``open_backend`` and ``load_dataset`` apply. The names are
``export_bundle`` and ``run_simulation`` because ``fwdllm.export`` and ``fwdllm.simulate``
are the modules that implement them.

    import fwdllm
    manifest = fwdllm.export_bundle("minilm", "bundles/bbc", label_names=["business", "tech"])
    summary = fwdllm.run_simulation("bundles/bbc", "bbc", "runs/bbc", steps=20)
    with fwdllm.open_backend("bundles/bbc") as backend: ...

The coordinator core, driven without any transport, is ``fwdllm.coordinator.rounds.Coordinator``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fwdllm.data.datasets import Dataset
    from fwdllm.device_runtime.backend import Backend
    from fwdllm.proto.manifest import Manifest
    from fwdllm.simulate_inprocess import InProcessResult


def export_bundle(
    model: str,
    out: str | Path,
    *,
    task: str = "seq-cls",
    label_names: list[str] | None = None,
    num_labels: int | None = None,
    formats: list[str] | tuple[str, ...] = ("onnx",),
    precisions: list[str] | None = None,
    peft: str = "lora",
    seq_len: int = 64,
    **peft_options: Any,
) -> Manifest:
    """`fwdllm export`: a Hugging Face checkpoint (or a shipped name: minilm, smollm2) with a PEFT method
    -> a validated bundle in ``out``. ``peft_options`` are ``PeftOptions`` fields (trainable_layers,
    lora_r, lora_alpha, lora_targets, adapter_reduction, from_peft_adapter, seed)."""
    from fwdllm.export.pipeline import ExportRequest
    from fwdllm.export.pipeline import export as run_export
    from fwdllm.export.plan import PeftOptions

    request = ExportRequest(
        model=model,
        task=task,
        out=Path(out),
        formats=list(formats),
        precisions=precisions,
        num_labels=num_labels if num_labels is not None else (len(label_names) if label_names else None),
        label_names=label_names,
        peft=PeftOptions(method=peft, **peft_options),
        seq_len=seq_len,
    )
    return run_export(request)


def run_simulation(
    bundle: str | Path,
    data: str,
    out: str | Path,
    *,
    in_process: bool = False,
    progress: bool = False,
    **settings: Any,
) -> dict | InProcessResult:
    """`fwdllm simulate`: a federated run of virtual clients on this machine; ``settings`` are ``SimConfig``
    fields (clients, per_step, steps, perturbations, optimizer, lr, alpha, seed, backend ...).

    By default real coordinator and device processes over loopback gRPC, writing ``out`` (report, plot,
    metrics, θ) and returning the summary; ``in_process=True`` runs the same coordinator core and device
    work in this process (no files but ``out``'s θ) and returns the per-step rows and final θ."""
    from fwdllm.sim_config import SimConfig

    cfg = SimConfig(bundle=str(bundle), data=data, **settings)
    if in_process:
        from fwdllm.simulate_inprocess import run

        result = run(cfg, progress=progress)
        result.save_theta(Path(out) / "theta.safetensors")
        return result
    from fwdllm.simulate import simulate as run_processes

    return run_processes(cfg, Path(out), progress=progress)


def open_backend(bundle: str | Path, backend: str | None = None, **options: Any) -> Backend:
    """A device backend on a bundle (default: the registry's default, ONNX Runtime); use it as a context
    manager. ``options`` are the backend's (threads, prefix_reuse ...)."""
    from fwdllm.device_runtime.backend import DEFAULT_BACKEND
    from fwdllm.device_runtime.backend import open_backend as open_named

    return open_named(bundle, backend or DEFAULT_BACKEND, options=options)


def load_dataset(spec: str, **options: Any) -> Dataset:
    """A data set by spec (``bbc``, ``csv:reviews.csv`` ...), split into train and held-out; ``options`` are
    ``LoadOptions`` fields (text_column, label_column, heldout_file, label_map ...)."""
    from fwdllm.data.datasets import LoadOptions
    from fwdllm.data.datasets import load_dataset as load

    return load(spec, LoadOptions(**options))
