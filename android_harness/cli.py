"""`fwdllm android doctor|deploy|bench|run-client`: phones and aarch64 boards over adb (README.md here)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "android",
        help="deploy to, run on and benchmark phones and dev boards over adb",
        description="Talk to a phone or an adbd board through adb (--adb PATH or $ADB).",
    )
    sub = p.add_subparsers(dest="android_command", metavar="ACTION", required=True)

    def common(q: argparse.ArgumentParser, remote: bool = True) -> None:
        q.add_argument("--serial", "-s", help="device serial (needed when several are attached)")
        q.add_argument("--adb", help="adb executable (default: $ADB, else adb on PATH)")
        if remote:
            q.add_argument(
                "--remote-dir",
                default="/data/local/tmp/fwdllm",
                help="working folder on the device (default /data/local/tmp/fwdllm)",
            )

    q = sub.add_parser("doctor", help="adb, devices, ABI, Android version, SoC, accelerators, Termux")
    common(q, remote=False)
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.set_defaults(handler=_doctor)

    q = sub.add_parser("deploy", help="push a bundle, the device runtime and/or benchmark_model, with checksums")
    common(q)
    q.add_argument("--bundle", type=Path, help="bundle folder to push (from `fwdllm export`)")
    q.add_argument(
        "--no-runtime", dest="runtime", action="store_false", help="do not push and install the fwdllm device runtime"
    )
    q.add_argument("--runtime-wheel", type=Path, help="fwdllm wheel to install (default: build one from this checkout)")
    q.add_argument(
        "--wheelhouse", type=Path, help="folder of device wheels (e.g. aarch64) to push and install from offline"
    )
    q.add_argument("--benchmark-model", type=Path, help="LiteRT benchmark_model binary for the device's ABI")
    q.add_argument("--remote-python", help="python on the device (default: Termux's, else python3)")
    q.add_argument("--venv", action="store_true", help="install into REMOTE_DIR/venv (--system-site-packages)")
    q.set_defaults(handler=_deploy)

    q = sub.add_parser("bench", help="benchmark_model on the bundle's TFLite graph, per delegate, with perturbed θ")
    common(q)
    q.add_argument("--bundle", type=Path, required=True, help="the bundle deployed to the device (local copy)")
    q.add_argument(
        "--delegates",
        default="cpu,xnnpack,gpu,nnapi",
        help="comma list of cpu, xnnpack, gpu, nnapi (default: all four)",
    )
    q.add_argument("--qnn-delegate", help="device path of the QNN/Hexagon delegate .so (libQnnTFLiteDelegate.so)")
    q.add_argument("--qnn-options", default="backend_type:htp", help="its --external_delegate_options")
    q.add_argument("--threads", type=int, default=1)
    q.add_argument("--warmup-runs", type=int, default=2)
    q.add_argument("--num-runs", type=int, default=20)
    q.add_argument("--epsilon", type=float, default=1e-3, help="perturbation size of the θ rows fed")
    q.add_argument("--seed", type=int, default=0, help="first perturbation seed")
    q.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for the JSON and Markdown")
    q.set_defaults(handler=_bench)

    q = sub.add_parser("run-client", help="run `fwdllm device run` on the device against this machine's coordinator")
    common(q)
    q.add_argument("--port", type=int, default=50051, help="the coordinator's port here (forwarded with adb reverse)")
    q.add_argument("--data", type=Path, help="the device's local JSONL data (pushed, passed as --data)")
    q.add_argument("--log", type=Path, help="also append the device log to this file")
    q.add_argument("--duration", type=float, help="stop the client after this many seconds")
    q.add_argument("client_args", nargs=argparse.REMAINDER, help="after --: more `fwdllm device run` arguments")
    q.set_defaults(handler=_run_client)


def _adb(args):
    from fwdllm.android_harness.adb import Adb

    return Adb(args.adb, args.serial)


def _doctor(args) -> int:
    from fwdllm.android_harness.harness import RUNTIME_ABIS, probe

    adb = _adb(args)
    devices = adb.devices()
    info = probe(adb)
    if args.json:
        print(
            json.dumps({"adb": adb.exe, "devices": [d.__dict__ for d in devices], "device": info.to_json()}, indent=2)
        )
        return 0
    print(f"adb          {adb.exe}")
    print(f"devices      {', '.join(f'{d.serial} ({d.state})' for d in devices)}")
    print(f"device       {info.serial}: {info.model}")
    print(
        f"ABI          {info.abi} ({', '.join(info.abilist)})"
        + ("" if set(info.abilist) & set(RUNTIME_ABIS) else "  <- the device runtime needs arm64-v8a or x86_64")
    )
    print(f"OS           {info.os}")
    print(f"SoC          {info.soc}")
    print(f"memory       {info.memory_mb} MB" if info.memory_mb else "memory       unknown")
    print(f"accelerators {', '.join(info.accelerators) or 'none found (CPU only)'}")
    print(f"Termux       {'yes' if info.termux else 'no'}")
    print(f"python       {info.python or 'none (install Termux + `pkg install python`, or python3 on a board)'}")
    return 0


def _deploy(args) -> int:
    from fwdllm.android_harness.harness import deploy

    if args.bundle is None and not args.runtime and args.benchmark_model is None:
        from fwdllm.errors import UserError

        raise UserError("nothing to deploy: give --bundle, --benchmark-model, or drop --no-runtime")
    report = deploy(
        _adb(args),
        args.remote_dir,
        bundle=args.bundle,
        runtime=args.runtime,
        runtime_wheel=args.runtime_wheel,
        wheelhouse=args.wheelhouse,
        benchmark_model=args.benchmark_model,
        remote_python=args.remote_python,
        venv=args.venv,
    )
    print(
        f"deployed to {report['device']['serial']}:{args.remote_dir}: {len(report['pushed'])} file(s) pushed, "
        f"{len(report['skipped'])} already there (same sha256)"
    )
    if report["state"].get("python"):
        print(f"device runtime: {report['state']['python']} -m fwdllm")
    return 0


def _bench(args) -> int:
    from fwdllm.android_harness.harness import bench, bench_markdown, write_bench

    delegates = tuple(d.strip() for d in args.delegates.split(",") if d.strip())
    doc = bench(
        _adb(args),
        args.bundle,
        args.remote_dir,
        delegates,
        args.qnn_delegate,
        args.qnn_options,
        args.threads,
        args.warmup_runs,
        args.num_runs,
        args.epsilon,
        args.seed,
    )
    doc["command"] = "fwdllm android bench " + " ".join(
        f"--{k.replace('_', '-')} {v}"
        for k, v in (
            ("bundle", args.bundle),
            ("delegates", args.delegates),
            ("num_runs", args.num_runs),
            ("threads", args.threads),
        )
    )
    js, md = write_bench(doc, args.out)
    print(bench_markdown(doc))
    print(f"wrote {js} and {md}")
    return 0 if any(r["status"] == "ok" for r in doc["rows"]) else 1


def _run_client(args) -> int:
    from fwdllm.android_harness.harness import run_client

    extra = args.client_args[1:] if args.client_args[:1] == ["--"] else args.client_args
    return run_client(_adb(args), args.port, args.remote_dir, extra, args.data, args.log, args.duration)
