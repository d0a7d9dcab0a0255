"""`fwdllm device info`, `fwdllm device run` and `fwdllm bench`."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _backend_args(p: argparse.ArgumentParser) -> None:
    from fwdllm.device_runtime.backend import BACKENDS, DEFAULT_BACKEND

    p.add_argument("--backend", default=DEFAULT_BACKEND, choices=list(BACKENDS))
    p.add_argument("--precision", help="graph precision to run (default: the first the bundle has)")
    p.add_argument("--threads", type=int, default=1, help="runtime threads (default 1)")
    p.add_argument(
        "--provider",
        type=_csv,
        help="onnxruntime providers in fallback order, e.g. nnapi,xnnpack,cpu "
        "(default: every accelerator this build has, then cpu)",
    )
    p.add_argument(
        "--optimization",
        default="all",
        choices=["disable", "basic", "extended", "all"],
        help="onnxruntime graph optimisation level",
    )
    p.add_argument(
        "--kernels",
        default="xnnpack",
        choices=["xnnpack", "builtin", "reference"],
        help="LiteRT kernels: XNNPACK (default), builtin without XNNPACK, or the reference kernels",
    )
    p.add_argument(
        "--delegate",
        action="append",
        default=[],
        metavar="LIB.so",
        help="LiteRT external delegate library (repeatable); one that fails to load falls back to CPU",
    )
    p.add_argument(
        "--delegate-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="option passed to every --delegate (repeatable)",
    )
    p.add_argument("--no-prefix-reuse", action="store_true", help="run the full graph even when the bundle is cut")


def backend_options(args: argparse.Namespace) -> dict:
    from fwdllm.device_runtime.backend import BACKENDS

    return {
        "threads": args.threads,
        "prefix_reuse": not args.no_prefix_reuse,
        **BACKENDS[args.backend].cli_options(args),
    }


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("device", help="run a device: what it can do, and serving a coordinator")
    sub = p.add_subparsers(dest="device_command", metavar="SUBCOMMAND", required=True)

    q = sub.add_parser("info", help="backends, providers/delegates, threads and ABI of this machine")
    q.add_argument("--bundle", type=Path, help="also open every backend on this bundle and show what it uses")
    q.add_argument("--json", action="store_true")
    q.set_defaults(handler=_info)

    r = sub.add_parser("run", help="join a coordinator and compute forward gradients until the run ends")
    r.add_argument("--coordinator", required=True, metavar="HOST:PORT")
    r.add_argument("--bundle", type=Path, required=True, help="the bundle of the run (`fwdllm export`)")
    r.add_argument("--data", type=Path, required=True, help="this device's JSONL examples (`fwdllm data partition`)")
    r.add_argument("--token", default="", help="enrolment token (`fwdllm coordinator token`)")
    r.add_argument("--tls-ca", type=Path, help="CA certificate (PEM) of a TLS coordinator")
    r.add_argument("--tls-cert", type=Path, help="this device's certificate (PEM), for a coordinator that requires one")
    r.add_argument("--tls-key", type=Path, help="the private key (PEM) of --tls-cert")
    r.add_argument("--name", default="", help="a name for operators (default: the host name)")
    r.add_argument("--state", type=Path, help="file keeping the client id and unacknowledged results across restarts")
    r.add_argument("--max-seeds", type=int, default=4096, help="refuse tasks with more seeds than this")
    r.add_argument("--max-tasks", type=int, help="stop after this many tasks (default: until the run ends)")
    _backend_args(r)
    r.set_defaults(handler=_run)

    b = subparsers.add_parser("bench", help="benchmark every backend x delegate x precision of a bundle")
    b.add_argument("--bundle", type=Path, required=True)
    b.add_argument("--backend", type=_csv, help="backends to include (default: all the bundle has)")
    b.add_argument("--delegate", type=_csv, help="delegates/providers to include, e.g. cpu,xnnpack,builtin or LIB.so")
    b.add_argument("--precision", type=_csv, help="precisions to include")
    b.add_argument("--perturbations", type=int, default=8, help="θ rows per call where the graph's P is dynamic")
    b.add_argument("--seeds", type=int, default=16, help="seeds per measured task (default 16)")
    b.add_argument("--batch", type=int, default=8, help="examples per batch (default 8)")
    b.add_argument("--threads", type=int, default=1)
    b.add_argument("--runs", type=int, default=10, help="timed runs per figure (medians)")
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--no-backprop", action="store_true", help="skip the PyTorch LoRA + AdamW memory reference")
    b.add_argument("--json", type=Path, metavar="OUT", help="write all figures as JSON")
    b.add_argument("--markdown", type=Path, metavar="OUT", help="write the table as Markdown")
    b.set_defaults(handler=_bench)


def _info(args: argparse.Namespace) -> int:
    import os
    import platform

    from fwdllm.device_runtime.backend import BACKENDS, open_backend
    from fwdllm.errors import UserError

    backends: dict[str, dict[str, Any]] = {}
    bundle: dict[str, dict[str, Any]] = {}
    report: dict[str, object] = {
        "abi": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "cpu_count": os.cpu_count(),
        "backends": backends,
    }
    for name, cls in BACKENDS.items():
        try:
            backends[name] = cls.runtime_info()
        except ImportError as exc:
            backends[name] = {"error": str(exc)}
    if args.bundle:
        report["bundle"] = bundle
        for name in BACKENDS:
            try:
                backend = open_backend(args.bundle, name)
                bundle[name] = backend.info()
                backend.close()
            except UserError as exc:
                bundle[name] = {"unavailable": str(exc)}
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(f"{report['abi']}, {report['os']}, {report['cpu_count']} CPUs")
        for name, info in backends.items():
            print(f"  {name:12s} {json.dumps(info, default=str)}")
        for name, info in bundle.items():
            print(f"  bundle/{name}: {json.dumps(info, default=str)}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from fwdllm.device_runtime.client import ClientConfig, DeviceClient

    cfg = ClientConfig(
        coordinator=args.coordinator,
        bundle=args.bundle,
        data=args.data,
        backend=args.backend,
        precision=args.precision,
        options=backend_options(args),
        token=args.token,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        name=args.name,
        state_file=args.state,
        max_seeds=args.max_seeds,
    )
    client = DeviceClient(cfg)

    stopped_by: list[int] = []

    def stop(signum, _frame):  # first Ctrl-C / SIGTERM: leave cleanly; a second one interrupts at once
        print(
            f"fwdllm device run: interrupted ({signal.Signals(signum).name}); submitting what is computed and "
            "leaving the run",
            file=sys.stderr,
        )
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
        stopped_by.append(signum)
        client.stop()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    code = client.run(max_tasks=args.max_tasks)
    print(json.dumps(client.stats))
    return 128 + stopped_by[0] if stopped_by else code  # the shell's convention for a process a signal stopped


def _bench(args: argparse.Namespace) -> int:
    from fwdllm.device_runtime.bench import bench, table

    result = bench(
        args.bundle,
        args.backend,
        args.delegate,
        args.precision,
        args.perturbations,
        args.threads,
        args.batch,
        args.seeds,
        args.runs,
        args.warmup,
        backprop=not args.no_backprop,
    )
    result["command"] = "fwdllm bench " + " ".join(
        f"--{k.replace('_', '-')} {','.join(v) if isinstance(v, list) else v}"
        for k, v in vars(args).items()
        if k in ("bundle", "backend", "delegate", "precision", "perturbations", "seeds", "batch", "threads", "runs")
        and v
    )
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if args.markdown:
        args.markdown.write_text(f"# fwdllm bench\n\n`{result['command']}`\n\n{table(result, markdown=True)}\n")
    return 0
