"""LLaMA-7B + LoRA on paper: memory and seconds per perturbed evaluation, extrapolated from SmolLM2-135M.

    python bench/llama7b.py            # llama.cpp q4_0/q8_0, ONNX Runtime fp32/int8; 2, 16 and 30 layers; 5 repeats
    python bench/llama7b.py --quick    # llama.cpp q4_0; 2 and 30 layers; 2 repeats (make bench-quick)

The FwdLLM paper fine-tunes LLaMA-7B on a phone; a 7B model does not fit make bench's hour on two shared cores, so
this measures one layer of SmolLM2-135M in each runtime and scales it to LLaMA-7B's shapes. SmolLM2 exported with its
first 2, 16 and 30 layers (same weights, config cut) gives a line over layer counts whose slope is the per-layer cost
and whose intercept the fixed one (embedding, LM head, loss, runtime); the notes state what the scaling assumes.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import harness  # noqa: E402
from bench.llama7b_model import (  # noqa: E402
    BATCH,
    BITS,
    GB,
    HF_KEYS,
    HOST_PIPES,
    LLAMA_7B,
    LORA_R,
    MIB,
    PAPER_GB,
    SEQ,
    SMOLLM2,
    Decoder,
    fit_line,
    head_flops,
    kv_bytes_per_layer,
    layer_flops,
    layer_params,
    lora_values,
    memory_7b,
    params,
    phone_factor,
    seconds_7b,
    weight_bytes,
)
from bench.report import write_results  # noqa: E402
from fwdllm.device_runtime.backend import BACKENDS  # noqa: E402
from fwdllm.proto.names import GraphFormat, Task  # noqa: E402


def checkpoint(layers: int) -> str:
    """`--model` for SmolLM2's first ``layers`` layers: the checkpoint's files linked, config.json cut (the loader skips
    the other layers' weights). Needs one full export first; checks SMOLLM2's shapes, which every ratio here uses."""
    from fwdllm.export.models import CACHE

    if layers == SMOLLM2.layers:
        return "smollm2"
    full, out = CACHE / "smollm2-hf", harness.CACHE / f"smollm2-{layers}layers-hf"
    config = json.loads((full / "config.json").read_text())
    if Decoder(*(config[k] for k in HF_KEYS)) != SMOLLM2:
        raise RuntimeError(f"the SmolLM2 checkpoint's shapes are not {SMOLLM2}")
    if not (out / "config.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        for f in [f for f in full.iterdir() if f.name != "config.json" and not (out / f.name).exists()]:
            (out / f.name).symlink_to(f)
        (out / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}, indent=2))
    return str(out)


def bundle(backend: str, layers: int) -> Path:
    """The cached export (an absolute checkpoint path puts its bundle beside it in the cache)."""
    # the full GGUF export with bench/llama_channels.py's precisions: one cached export serves both
    fmt = BACKENDS[backend].graph_format
    precision = {
        GraphFormat.GGUF: "q4_0,q8_0,f16" if layers == SMOLLM2.layers else "q4_0,q8_0",
        GraphFormat.ONNX: "fp32,int8",
    }[fmt]
    return harness.bundle(
        "lora",
        model=checkpoint(layers),
        formats=fmt,
        precision=precision,
        task=Task.CAUSAL_LM,
        seq_len=SEQ,
        labels=[],
    )


def graph_bytes(bundle_dir: Path, backend: str, precision: str) -> int:
    from fwdllm.proto.manifest import load_manifest

    cls = BACKENDS[backend]
    graph = load_manifest(bundle_dir).graph(cls.graph_format, cls.theta_role, precision)
    return (bundle_dir / graph.file).stat().st_size


def workload(backend, bundle_dir: Path):
    """8 BBC sequences × 64 tokens, all labelled, and one θ row as a perturbation makes it."""
    from bench.llama_channels import bbc_batch

    return bbc_batch(bundle_dir, BATCH, SEQ), np.random.default_rng(0).normal(0, 0.01, (1, backend.theta_dim)).astype(
        "f4"
    )


def child(spec: dict) -> dict:
    """In a fresh process: the resident bytes of the loaded model, after malloc_trim (loading leaves freed heap that
    glibc may or may not hand back, 300 MiB either way for ONNX Runtime fp32), then the peak RSS of three perturbed
    evaluations (ONNX Runtime plans its memory on the second)."""
    from fwdllm.device_runtime.backend import open_backend

    backend = open_backend(Path(spec["bundle"]), spec["backend"], spec["precision"], {"threads": 1, **spec["options"]})
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    loaded = int(
        dict(ln.split(":", 1) for ln in Path("/proc/self/status").read_text().splitlines())["VmRSS"].split()[0]
    )
    batch, theta = workload(backend, Path(spec["bundle"]))
    for _ in range(3):
        backend.losses(batch, theta)
    out = {"peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "loaded_bytes": loaded * 1024}
    if spec["backend"] == "llama.cpp":
        out["kv_cells"] = int(backend.L.llama_n_ctx(backend.ctx))
    return out


def peak_memory(spec: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__)), "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"memory child {spec} failed: {proc.stderr.strip()[-800:]}")
    return json.loads(lines[-1])


def eval_seconds(cases: dict[tuple, Path], repeats: int) -> dict[tuple, dict[str, list[float]]]:
    """Wall and CPU seconds of one perturbed evaluation per case, all open at once, repeats interleaved (rounds 0 and 1
    warm up: ONNX Runtime plans its memory on its second run). One thread computes, the caller's, so CPU time is what
    an evaluation costs a core when other processes share it; wall time then also holds their turns."""
    from fwdllm.device_runtime.backend import open_backend

    opened = {}
    for key, bundle_dir in cases.items():
        backend = open_backend(bundle_dir, key[0], key[1], {"threads": 1})
        opened[key] = (backend, *workload(backend, bundle_dir))
    times: dict[tuple, dict[str, list[float]]] = {key: {"wall": [], "cpu": []} for key in cases}
    for r in range(repeats + 2):
        for key, (backend, batch, theta) in opened.items():
            wall, cpu = time.perf_counter(), time.process_time()
            backend.losses(batch, theta)
            if r >= 2:
                times[key]["wall"].append(time.perf_counter() - wall)
                times[key]["cpu"].append(time.process_time() - cpu)
    for backend, *_ in opened.values():
        backend.close()
    return times


def host() -> dict:
    """This core's SIMD width per runtime and its clock, for the phone factor."""
    from fwdllm.device_runtime.llama_ctypes import import_llama

    info = import_llama().llama_print_system_info().decode()
    cpuinfo = [ln.split(":", 1) for ln in Path("/proc/cpuinfo").read_text().splitlines() if ":" in ln]
    fields = {key.strip(): value for key, value in cpuinfo}
    flags, mhz = fields["flags"].split(), float(fields["cpu MHz"])
    ggml = 512 if "AVX512 = 1" in info else 256 if "AVX2 = 1" in info else 128
    mlas = 512 if "avx512f" in flags else 256 if "avx2" in flags else 128  # ONNX Runtime's MLAS picks by CPUID
    return {"ghz": mhz / 1000, "bits": {"llama.cpp": ggml, "onnxruntime": mlas}, "ggml": info.strip()}


def measure(
    configs: list[tuple[str, str]], layer_counts: list[int], repeats: int, memory_repeats: int, no_mmap: bool
) -> list[dict]:
    layer_counts = sorted(layer_counts, reverse=True)  # the full export first: it writes the checkpoint others cut
    bundles = {(b, L): bundle(b, L) for b in dict.fromkeys(b for b, _ in configs) for L in layer_counts}
    memory = {}
    for backend, precision in configs:  # before any model is loaded here: a child starts at its parent's peak RSS
        for off in [False] + ([True] if no_mmap and (backend, precision) == ("llama.cpp", "q4_0") else []):
            for L in layer_counts:
                spec = {
                    "bundle": str(bundles[backend, L]),
                    "backend": backend,
                    "precision": precision,
                    "options": {"mmap": False} if off else {},
                }
                runs = [peak_memory(spec) for _ in range(memory_repeats if L == SMOLLM2.layers else 1)]
                memory[backend, precision, off, L] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    load, times = (
        os.getloadavg()[0],
        eval_seconds({(b, p, L): bundles[b, L] for b, p in configs for L in layer_counts}, repeats),
    )
    cpu = {**host(), "load_before": load, "load_after": os.getloadavg()[0]}
    rows = []
    for backend, precision in configs:
        bits = BITS[backend, precision]
        med = {L: statistics.median(times[backend, precision, L]["cpu"]) for L in layer_counts}
        per_layer_s, fixed_s, resid_s = fit_line(layer_counts, [med[L] for L in layer_counts])
        file_slope, file_fixed, _ = fit_line(
            layer_counts, [graph_bytes(bundles[backend, L], backend, precision) for L in layer_counts]
        )
        here = seconds_7b(per_layer_s, fixed_s)
        row = {
            "configuration": f"{backend} {precision}",
            "SmolLM2 eval s": med[SMOLLM2.layers],
            "SmolLM2 eval wall s": statistics.median(times[backend, precision, SMOLLM2.layers]["wall"]),
            "per layer ms": 1000 * per_layer_s,
            "fixed s": fixed_s,
            "time fit residual": f"{100 * resid_s:.0f}%",
            "7B weights GB (params × bpw)": weight_bytes(LLAMA_7B, bits) / GB,
            "7B s/eval here": here,
            "7B s/eval X1": here * phone_factor(cpu["bits"][backend], cpu["ghz"], "X1"),
            "7B s/eval A78": here * phone_factor(cpu["bits"][backend], cpu["ghz"], "A78"),
            "paper peak GB": PAPER_GB[backend, precision],
            "raw": {
                "eval_s": {L: times[backend, precision, L] for L in layer_counts},
                "file_bytes_fixed": file_fixed,
                "file_bytes_per_layer": file_slope,
                "host": cpu,
            },
        }
        for off in [off for off in (False, True) if (backend, precision, off, layer_counts[0]) in memory]:
            got = [memory[backend, precision, off, L] for L in layer_counts]
            per_layer_b, fixed_b, resid_b = fit_line(layer_counts, [m["loaded_bytes"] for m in got])
            fixed_b += got[0]["peak_bytes"] - got[0]["loaded_bytes"]  # what evaluating adds, at the full model
            cells = row["raw"]["kv_cells"] = int(got[0].get("kv_cells", 0))
            est = memory_7b(per_layer_b, fixed_b, file_fixed, backend, bits, cells)
            suffix = ", mmap off" if off else ""
            row |= {
                f"SmolLM2 peak MiB{suffix}": got[0]["peak_bytes"] / MIB,
                f"per layer MiB{suffix}": per_layer_b / MIB,
                f"7B peak GB{suffix}": est / GB,
            }
            row["raw"][f"memory{suffix}"] = dict(zip(layer_counts, got))
            row["raw"][f"loaded fit residual{suffix}"] = resid_b
        row["per layer MiB, weights (params × bpw)"] = layer_params(SMOLLM2) * bits[0] / 8 / MIB
        rows.append(row)
    return rows


COLUMNS = [
    "configuration",
    "SmolLM2 eval s",
    "SmolLM2 eval wall s",
    "per layer ms",
    "fixed s",
    "time fit residual",
    "SmolLM2 peak MiB",
    "per layer MiB",
    "per layer MiB, weights (params × bpw)",
    "per layer MiB, mmap off",
    "7B weights GB (params × bpw)",
    "7B peak GB",
    "7B peak GB, mmap off",
    "paper peak GB",
    "7B s/eval here",
    "7B s/eval X1",
    "7B s/eval A78",
]


def notes(rows: list[dict], layer_counts: list[int], repeats: int, memory_repeats: int) -> str:
    cpu, by, counts = rows[0]["raw"]["host"], {r["configuration"]: r for r in rows}, ", ".join(map(str, layer_counts))
    cells = max(r["raw"]["kv_cells"] for r in rows)  # llama.cpp's context: 64 tokens padded
    q4_bytes = weight_bytes(LLAMA_7B, BITS["llama.cpp", "q4_0"])
    loaded_miss = max(v for r in rows for k, v in r["raw"].items() if k.startswith("loaded fit residual"))
    fixed_share = max(r["fixed s"] * head_flops(LLAMA_7B) / head_flops(SMOLLM2) / r["7B s/eval here"] for r in rows)
    factors = ", ".join(
        f"{b} {cpu['bits'][b]}-bit: X1 ×{phone_factor(cpu['bits'][b], cpu['ghz'], 'X1'):.2f}, A78 "
        f"×{phone_factor(cpu['bits'][b], cpu['ghz'], 'A78'):.2f}"
        for b in dict.fromkeys(r["configuration"].split()[0] for r in rows)
    )
    setup = (
        f"SmolLM2-135M + LoRA (r {LORA_R} on q/v of every layer) exported with its first {counts} layers; one "
        f"perturbed evaluation = `losses()` on one new θ row, {BATCH} BBC News sequences × {SEQ} tokens, all labelled, "
        f"1 thread; medians of {repeats} interleaved repeats, every configuration and layer count open at once. "
        "Times are the process's CPU seconds (the 30-layer model's wall seconds beside them): the machine's cores were "
        f"shared, 1-minute load average {cpu['load_before']:.1f} before the timing and {cpu['load_after']:.1f} after. "
        "Memory: fresh processes that load the bundle and run three evaluations, their peak RSS (ru_maxrss) and their "
        f"resident bytes once loaded (after malloc_trim); medians of {memory_repeats} for the 30-layer model, one per "
        f"cut model (the loaded bytes' line misses no point by more than {100 * loaded_miss:.2f}%). "
        "'per layer' and 'fixed' are slope and intercept of least-squares lines over the layer counts, of the seconds "
        "('time fit residual': the line's largest miss) and of the loaded bytes; 'SmolLM2' columns: the 30-layer model."
    )
    method = (
        "**Method and assumptions.** *Time*: LLaMA-7B (32 layers, hidden 4096, FFN 11008, 32 heads and 32 KV heads, "
        f"vocabulary 32000, {params(LLAMA_7B):,} parameters; LoRA r {LORA_R} on q/v: {lora_values(LLAMA_7B):,} values) "
        f"= 32 × per layer × {layer_flops(LLAMA_7B) / layer_flops(SMOLLM2):.1f} (a 7B layer's FLOPs over a SmolLM2 "
        f"layer's at {SEQ} tokens: matmuls, LoRA, attention) + fixed × "
        f"{head_flops(LLAMA_7B) / head_flops(SMOLLM2):.2f} (the LM head's FLOPs ratio; the loss's softmax, which grows "
        "only with the vocabulary, is scaled with it: an overestimate of a term that is at most "
        f"{100 * fixed_share:.1f}% of any 7B estimate). It assumes a 7B layer runs at the FLOP rate a SmolLM2 layer "
        f"runs here; SmolLM2's weights fit this machine's caches and 7B's do not, but a decode of {SEQ} tokens streams "
        f"them once ({q4_bytes / GB:.1f} GB at q4_0, {BATCH} decodes per evaluation): {BATCH * q4_bytes / 10e9:.0f} s "
        "at an assumed 10 GB/s per core, small beside the compute. *Memory*: 7B peak = the runtime's own overhead "
        "(SmolLM2's fixed loaded bytes plus what evaluating adds at its peak, less its non-layer weights, the "
        "intercept of the graph files' sizes over the layer counts, and less its activations) + LLaMA-7B's embedding "
        "and LM head at the format's bits + its activations (logits, log-softmax and FFN buffers of one evaluation, "
        "`activation_bytes`) + 32 × (SmolLM2's loaded bytes per layer less its KV cache, × "
        f"{layer_params(LLAMA_7B) / layer_params(SMOLLM2):.1f}, the parameter ratio, + a 7B layer's KV cache: "
        f"llama.cpp's {cells} cells in f16, {kv_bytes_per_layer(LLAMA_7B, cells) / MIB:.0f} MiB). '7B weights' is "
        "parameter count × bits per weight (q4_0 4.5 and q8_0 8.5, as llama.cpp's quantize README states; fp32 32; "
        "ONNX int8 8 with the embedding in fp32, as ONNX Runtime's dynamic quantization leaves it); 'per layer MiB' "
        "against 'weights (params × bpw)' shows the bytes per weight a runtime really holds. llama.cpp q4_0 with mmap "
        "(the backend's default) keeps the file's pages resident beside the repacked copy it computes with (q4_0_8x8 "
        "in this AVX2 build; ARM builds repack q4_0 too); with mmap off only the repacked copy stays. llama.cpp's own "
        "7B q4_0 files keep the LM head at q6_K, 34 MB more than 4.5 bits. *Phone*: an assumption, not a measurement: "
        f"time × (this core's SIMD bits × {HOST_PIPES} pipes × clock) / (the phone core's), this machine at "
        f"{cpu['ghz']:.2f} GHz (/proc/cpuinfo), llama.cpp's ggml at the widest ISA its build reports, ONNX Runtime's "
        "MLAS at the widest this CPU has; Cortex-X1 4 × 128-bit NEON at 2.85 GHz (the Pixel 7 Pro's big cores), an "
        f"A78-class core 2 × 128-bit at 2.35 GHz: {factors}. Peak width × clock only: a phone's sustained clock under "
        "load, its memory bandwidth and its kernels' efficiency are not modelled (each makes it slower), nor matrix "
        "engines this CPU may lend ONNX Runtime's int8 kernels (AMX), which would make the int8 factor too small."
    )
    mem = "; ".join(
        f"{r['configuration']} {r['7B peak GB']:.1f} GB"
        + (f" ({r['7B peak GB, mmap off']:.1f} with mmap off)" if "7B peak GB, mmap off" in r else "")
        for r in rows
    )
    paper = (
        "**Beside the paper.** The paper's reported figures: LLaMA-7B peak memory 4.0 GB at INT4 (GPTQ), 7.9 GB at "
        'INT8 and 15.6 GB at FP16 (Table 7, Pixel 7 Pro); "0.25 h to its accuracy on CPU"; a round of 0.74 s × 2 '
        "forwards + 1.68 s communication (3.16 s), × 20 steps (63.2 s). Estimated here: "
        + mem
        + (" (ONNX Runtime fp32 holds twice FP16's weights)." if "onnxruntime fp32" in by else ".")
    )
    if q4 := by.get("llama.cpp q4_0"):
        t = q4["7B s/eval X1"]
        paper += (
            f" One perturbed evaluation of {BATCH} × {SEQ} tokens at q4_0 on one X1-class core: {t:.0f} s, "
            f"{t / 0.74:.0f}× the paper's 0.74 s per forward (the batch, sequence length and threads behind that "
            f"figure are not part of it); the paper's round at this estimate takes 2 × {t:.0f} + 1.68 = "
            f"{2 * t + 1.68:.0f} s, and 20 steps {20 * (2 * t + 1.68) / 60:.0f} min."
        )
    return "\n\n".join([setup, method, paper])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="llama.cpp q4_0 only, 2 and 30 layers, 2 repeats")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-repeats", type=int, default=3, help="fresh processes per memory point (median)")
    parser.add_argument("--layers", default="2,16,30", help="layer counts of the SmolLM2 exports (must include 30)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    configs = [("llama.cpp", "q4_0"), ("llama.cpp", "q8_0"), ("onnxruntime", "fp32"), ("onnxruntime", "int8")]
    layer_counts = sorted({int(x) for x in args.layers.split(",")})
    if args.quick:
        configs, layer_counts, args.repeats, args.memory_repeats = configs[:1], [2, SMOLLM2.layers], 2, 1
    if SMOLLM2.layers not in layer_counts or len(layer_counts) < 2:
        parser.error(f"--layers needs {SMOLLM2.layers} and at least one other count")
    rows = measure(configs, layer_counts, args.repeats, args.memory_repeats, no_mmap=not args.quick)
    columns = [c for c in COLUMNS if any(c in r for r in rows)]
    command = " ".join(["python bench/llama7b.py", *(argv if argv is not None else sys.argv[1:])])
    path = write_results(
        "llama7b", command, rows, columns, notes(rows, layer_counts, args.repeats, args.memory_repeats)
    )
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
