"""bench: time the bundle's TFLite graph per delegate on the device, fed the θ rows a real task feeds it."""

from __future__ import annotations

import json
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fwdllm.android_harness.adb import Adb
from fwdllm.android_harness.benchparse import DelegateResult, parse_benchmark_output
from fwdllm.android_harness.deploy import DEFAULT_REMOTE_DIR, read_device_state, sync_files
from fwdllm.android_harness.probe import probe
from fwdllm.errors import UserError
from fwdllm.proto.manifest import load_manifest, load_theta
from fwdllm.proto.names import GraphFormat, GraphRole, ThetaChannel

DELEGATE_FLAGS = {
    "cpu": ["--use_xnnpack=false"],
    "xnnpack": ["--use_xnnpack=true"],
    "gpu": ["--use_xnnpack=false", "--use_gpu=true"],
    "nnapi": ["--use_xnnpack=false", "--use_nnapi=true"],
}


def graph_input_names(path: Path) -> list[str]:
    """The TFLite graph's input tensor names in call order (what benchmark_model's value files name)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:
        raise UserError("bench reads the TFLite graph with ai-edge-litert: pip install 'fwdllm[device]'") from exc
    return [d["name"] for d in Interpreter(model_path=str(path)).get_input_details()]


def bench_inputs(
    bundle: Path, epsilon: float, seed_start: int, texts: list[str], out_dir: Path
) -> tuple[dict[str, Path], dict]:
    """Raw value files for the bundle's TFLite full graph, θ rows perturbed as a central-difference task.

    The rows are the engine's own (``perturbed_rows``): θ + ε·v(seed_start+j), then θ − ε·v(seed_start+j),
    the call a central-difference task makes in training, so delegates are timed on real perturbed θ.
    """
    from fwdllm.device_runtime.backend import Tokenizer
    from fwdllm.device_runtime.engine import perturbed_rows
    from fwdllm.device_runtime.examples import Example

    manifest = load_manifest(bundle)
    graph = manifest.graph(GraphFormat.TFLITE, GraphRole.FULL)
    if graph.theta_channel != ThetaChannel.INPUT:
        raise UserError(
            f"the bundle's TFLite graph takes θ as {graph.theta_channel}, not as an input; bench needs an input"
        )
    specs = {t.name: t for t in graph.inputs}
    if "theta" not in specs:
        raise UserError(f"the TFLite full graph has no theta input (inputs: {list(specs)}); re-export the bundle")
    p, dim = int(specs["theta"].shape[0]), manifest.theta.dim
    theta0 = load_theta(bundle, manifest)
    k = (p + 1) // 2
    seeds = [seed_start + j for j in range(k)]
    rows = perturbed_rows(theta0, seeds, epsilon)[:p]
    b = int(specs["input_ids"].shape[0]) if "input_ids" in specs else 1
    tok = Tokenizer(bundle, manifest, seq_len=graph.seq_len)
    batch = tok.batch(
        [Example(text=texts[i % len(texts)], label=0, prompt=texts[i % len(texts)], target=" ok") for i in range(b)]
    )
    values = {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "labels": batch.labels,
        "theta": rows,
    }
    tensor_names = graph_input_names(bundle / graph.file)
    if len(tensor_names) != len(graph.inputs):
        raise UserError(
            f"{graph.file} has {len(tensor_names)} inputs, the manifest lists {len(graph.inputs)}; re-export"
        )
    files = {}
    for spec, tensor in zip(graph.inputs, tensor_names):
        if spec.name not in values:
            raise UserError(f"bench cannot fill TFLite input {spec.name!r}; it knows {list(values)}")
        arr = np.ascontiguousarray(values[spec.name], dtype=np.dtype(spec.dtype).newbyteorder("<"))
        path = out_dir / f"{spec.name}.bin"
        arr.tofile(path)
        files[tensor] = path
    meta = {
        "graph": graph.file,
        "precision": graph.precision,
        "perturbations": p,
        "seeds": seeds,
        "epsilon": epsilon,
        "theta_dim": dim,
        "batch": b,
        "seq_len": graph.seq_len,
    }
    return files, meta


def bench(
    adb: Adb,
    bundle: Path,
    remote_dir: str = DEFAULT_REMOTE_DIR,
    delegates: tuple[str, ...] = ("cpu", "xnnpack", "gpu", "nnapi"),
    qnn_delegate: str | None = None,
    qnn_options: str = "backend_type:htp",
    threads: int = 1,
    warmup_runs: int = 2,
    num_runs: int = 20,
    epsilon: float = 1e-3,
    seed_start: int = 0,
    texts: list[str] | None = None,
) -> dict:
    """Run benchmark_model once per delegate on the device; a failed delegate is reported, the rest still run."""
    unknown = [d for d in delegates if d not in DELEGATE_FLAGS]
    if unknown:
        raise UserError(f"unknown delegate(s) {unknown}; choose from {list(DELEGATE_FLAGS)} (QNN: --qnn-delegate PATH)")
    info = probe(adb)
    R = remote_dir.rstrip("/")
    state = read_device_state(adb, R)
    if state.get("benchmark_model"):
        runner = shlex.quote(state["benchmark_model"])
    elif state.get("python"):
        runner = f"{shlex.quote(state['python'])} -m fwdllm.android_harness.benchmark_model"
    else:
        raise UserError(
            f"nothing to benchmark with on {info.serial}: run `fwdllm android deploy --bundle B` "
            "(Python runner) or `fwdllm android deploy --benchmark-model PATH` first"
        )
    texts = texts or ["The match ended in a draw after extra time.", "Markets rallied on the interest rate news."]
    with tempfile.TemporaryDirectory(prefix="fwdllm-bench-") as tmp:
        files, meta = bench_inputs(bundle, epsilon, seed_start, texts, Path(tmp))
        manifest = load_manifest(bundle, verify_checksums=False)
        graph_file = bundle / meta["graph"]
        remote_inputs = {name: f"{R}/bench/{p.name}" for name, p in files.items()}
        sync_files(
            adb,
            [(graph_file, f"{R}/bundle/{meta['graph']}")] + [(p, remote_inputs[name]) for name, p in files.items()],
            desc="bench inputs",
        )
    value_files = ",".join(f"{name}:{path}" for name, path in remote_inputs.items())
    runs = [(d, DELEGATE_FLAGS[d]) for d in delegates]
    if qnn_delegate:
        runs.append(
            (
                "qnn",
                [
                    "--use_xnnpack=false",
                    f"--external_delegate_path={qnn_delegate}",
                    f"--external_delegate_options={qnn_options}",
                ],
            )
        )
    results: list[DelegateResult] = []
    commands = {}
    for name, flags in tqdm(runs, desc="delegates", disable=not sys.stderr.isatty()):
        argv = [
            f"--graph={R}/bundle/{meta['graph']}",
            f"--num_threads={threads}",
            f"--warmup_runs={warmup_runs}",
            f"--num_runs={num_runs}",
            f"--input_layer_value_files={value_files}",
            *flags,
        ]
        command = f"cd {shlex.quote(R)} && {runner} {' '.join(shlex.quote(a) for a in argv)} 2>&1"
        commands[name] = command
        proc = adb.shell(command, check=False, timeout=3600)
        results.append(parse_benchmark_output(proc.stdout.decode(errors="replace"), name, proc.returncode))
    return {
        "name": "android-bench",
        "device": info.to_json(),
        "model": manifest.model.source,
        "inputs": meta,
        "runner": runner,
        "commands": commands,
        "rows": [r.to_json() for r in results],
    }


BENCH_COLUMNS = [
    "delegate",
    "status",
    "avg_ms",
    "min_ms",
    "max_ms",
    "init_ms",
    "first_ms",
    "kernels",
    "memory_mb",
    "note",
]


def bench_markdown(doc: dict) -> str:
    dev = doc["device"]
    lines = [
        f"Device {dev['model']} ({dev['serial']}, {dev['abi']}, {dev['os']}, SoC {dev['soc']}); graph "
        f"{doc['inputs']['graph']} ({doc['inputs']['precision']}), "
        f"P={doc['inputs']['perturbations']} perturbed θ rows, "
        f"batch {doc['inputs']['batch']}x{doc['inputs']['seq_len']}.",
        "",
        "| " + " | ".join(BENCH_COLUMNS) + " |",
        "|" + "---|" * len(BENCH_COLUMNS),
    ]
    ms = lambda v: f"{v / 1000:.3f}" if v is not None else ""  # noqa: E731
    for r in doc["rows"]:
        cells = [
            r["delegate"],
            r["status"],
            ms(r["avg_us"]),
            ms(r["min_us"]),
            ms(r["max_us"]),
            ms(r["init_us"]),
            ms(r["first_us"]),
            "" if r["delegate_kernels"] is None else str(r["delegate_kernels"]),
            "" if r["memory_overall_mb"] is None else f"{r['memory_overall_mb']:.1f}",
            r["message"].replace("|", "/"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_bench(doc: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"android-bench-{doc['device']['serial'].replace(':', '_').replace('/', '_')}"
    js, md = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    js.write_text(json.dumps(doc, indent=2) + "\n")
    md.write_text(bench_markdown(doc))
    return js, md
