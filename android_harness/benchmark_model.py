"""A `benchmark_model`-compatible runner on the ``ai_edge_litert`` interpreter.

For a device with Python but no LiteRT ``benchmark_model`` binary (a dev board, a phone's
Termux, the emulated aarch64 root filesystem), ``python -m fwdllm.android_harness.benchmark_model``
takes the stock tool's flags that the harness uses and prints the stock tool's log lines,
so ``fwdllm android bench`` runs and parses either one the same way. Behaviour follows the
stock tool on Linux: ``--use_gpu`` and ``--use_nnapi`` print "… acceleration is
unsupported on this platform." and the graph runs on the CPU; an ``--external_delegate_path``
that cannot load prints "Failed to apply EXTERNAL delegate." and the run fails. The Python API
does not expose the execution plan, so a delegate's share is reported as its kernel count
("partially … w/ N delegate kernels").
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def _bool(text: str) -> bool:
    return text.lower() in ("1", "true", "yes")


def _log(msg: str, level: str = "INFO") -> None:
    print(f"{level}: {msg}", flush=True)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmark_model", description=__doc__.splitlines()[0])
    p.add_argument("--graph", required=True)
    p.add_argument("--num_threads", type=int, default=-1)
    p.add_argument("--warmup_runs", type=int, default=1)
    p.add_argument("--num_runs", type=int, default=50)
    p.add_argument("--use_xnnpack", type=_bool, default=False)
    p.add_argument("--use_gpu", type=_bool, default=False)
    p.add_argument("--use_nnapi", type=_bool, default=False)
    p.add_argument("--external_delegate_path", default="")
    p.add_argument("--external_delegate_options", default="", help="key1:value1;key2:value2")
    p.add_argument("--input_layer_value_files", default="", help="name1:file1,name2:file2 (raw tensor bytes)")
    p.add_argument("--signature_to_run_for", default="")
    p.add_argument("--report_peak_memory_footprint", type=_bool, default=False)
    return p.parse_args(argv)


def _input_files(spec: str) -> dict[str, str]:
    out = {}
    for item in filter(None, spec.split(",")):
        name, _, path = item.rpartition(":")
        if not name:
            raise SystemExit(f"ERROR: --input_layer_value_files entry {item!r} is not NAME:FILE")
        out[name] = path
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    from ai_edge_litert import interpreter as litert

    start_rss = _rss_mb()
    _log("STARTING!")
    _log(f"Graph: [{args.graph}]")
    _log(f"Num threads: [{args.num_threads}]")
    _log(f"Use xnnpack: [{int(args.use_xnnpack)}]")
    if not Path(args.graph).is_file():
        _log(f"Could not open '{args.graph}'.", "ERROR")
        _log("Benchmarking failed.", "ERROR")
        return 1
    delegates, names = [], []
    if args.use_gpu:
        _log("GPU acceleration is unsupported on this platform.")
    if args.use_nnapi:
        _log("NNAPI acceleration is unsupported on this platform.")
    if args.external_delegate_path:
        options = dict(kv.split(":", 1) for kv in filter(None, args.external_delegate_options.split(";")))
        try:
            delegates.append(litert.load_delegate(args.external_delegate_path, options))
            names.append("EXTERNAL")
        except (OSError, ValueError, RuntimeError) as exc:
            _log(f"Failed to load external delegate {args.external_delegate_path}: {exc}", "ERROR")
            _log("Failed to apply EXTERNAL delegate.", "ERROR")
            _log("Benchmarking failed.", "ERROR")
            return 1
    # XNNPACK is ai_edge_litert's default delegate; without --use_xnnpack the plain builtin kernels run.
    resolver = (
        litert.OpResolverType.AUTO if args.use_xnnpack else litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    )
    if args.use_xnnpack:
        names.insert(0, "XNNPACK")
    t0 = time.perf_counter()
    try:
        interp = litert.Interpreter(
            model_path=args.graph,
            num_threads=args.num_threads if args.num_threads > 0 else None,
            experimental_delegates=delegates or None,
            experimental_op_resolver_type=resolver,
        )
        interp.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        _log(f"Failed to construct interpreter: {exc}", "ERROR")
        _log("Benchmarking failed.", "ERROR")
        return 1
    _log(f"Loaded model {args.graph}")
    kernels = sum(op["op_name"] == "DELEGATE" for op in interp._get_ops_details())
    for name in names:
        if kernels:
            _log(
                f"Explicitly applied {name} delegate, and the model graph will be partially executed by the "
                f"delegate w/ {kernels} delegate kernels."
            )
        else:
            _log(f"Though {name} delegate is explicitly applied, the model graph will not be executed by the delegate.")
    _log(f"The input model file size (MB): {os.path.getsize(args.graph) / 1e6:g}")
    try:
        _set_inputs(interp, _input_files(args.input_layer_value_files))
    except ValueError as exc:
        _log(str(exc), "ERROR")
        _log("Benchmarking failed.", "ERROR")
        return 1
    init_us = (time.perf_counter() - t0) * 1e6
    init_rss = _rss_mb()
    _log(f"Initialized session in {init_us / 1000:.3f}ms.")
    warm = _timed_runs(interp, max(1, args.warmup_runs))
    _log(f"Running benchmark for at least {args.warmup_runs} iterations.")
    _log(_count_line(warm) + "\n")
    runs = _timed_runs(interp, max(1, args.num_runs))
    _log(f"Running benchmark for at least {args.num_runs} iterations.")
    _log(_count_line(runs) + "\n")
    _log(
        f"Inference timings in us: Init: {init_us:.0f}, First inference: {warm[0]:.0f}, "
        f"Warmup (avg): {statistics.fmean(warm):g}, Inference (avg): {statistics.fmean(runs):g}"
    )
    _log(
        f"Memory footprint delta from the start of the tool (MB): init={init_rss - start_rss:g} "
        f"overall={_rss_mb() - start_rss:g}"
    )
    if args.report_peak_memory_footprint:
        _log(f"Overall peak memory footprint (MB) via periodic monitoring: {_rss_mb():g}")
    return 0


def _set_inputs(interp, files: dict[str, str]) -> None:
    """Fill inputs from raw files, matched by tensor name or signature name; others keep zeros."""
    details = interp.get_input_details()
    signature = {}
    for sig in interp._get_full_signature_list().values():
        signature.update({name: idx for name, idx in sig["inputs"].items()})
    by_index = {d["index"]: d for d in details}
    by_name = {d["name"]: d for d in details} | {n: by_index[i] for n, i in signature.items() if i in by_index}
    for name, path in files.items():
        if name not in by_name:
            raise ValueError(f"Cannot find input layer {name!r}; the graph's inputs are {sorted(by_name)}")
        d = by_name[name]
        data = np.fromfile(path, dtype=d["dtype"])
        if data.size != int(np.prod(d["shape"])):
            raise ValueError(f"{path} holds {data.size} values, input {name} needs shape {list(d['shape'])}")
        interp.set_tensor(d["index"], data.reshape(d["shape"]))


def _timed_runs(interp, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        interp.invoke()
        times.append((time.perf_counter() - t) * 1e6)
    return times


def _count_line(times: list[float]) -> str:
    std = statistics.pstdev(times) if len(times) > 1 else 0.0
    return (
        f"count={len(times)} first={times[0]:.0f} curr={times[-1]:.0f} min={min(times):.0f} "
        f"max={max(times):.0f} avg={statistics.fmean(times):g} std={std:.0f}"
    )


if __name__ == "__main__":
    sys.exit(main())
