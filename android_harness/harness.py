"""doctor, deploy, bench and run-client: what `fwdllm android` does to a phone or board over adb.

Device layout under the remote directory R (default ``/data/local/tmp/fwdllm``)::

    R/bundle/        the bundle (manifest.json pushed last: a half-pushed bundle is never a bundle)
    R/wheels/        the fwdllm wheel, plus an offline wheelhouse when given
    R/venv/          with --venv: the device runtime's virtual environment
    R/bin/benchmark_model   a user-supplied LiteRT benchmark_model binary
    R/bench/         input value files of `bench`
    R/device.json    what deploy installed (python, ABI, benchmark_model), read by bench and run-client

Every file is pushed only when its sha256 on the device differs from the local one, and
checked again after the push: a deploy interrupted by a dropped connection is resumed by
running it again, and a partly written file is caught by its checksum.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fwdllm.android_harness.adb import Adb, AdbError
from fwdllm.android_harness.benchparse import DelegateResult, parse_benchmark_output
from fwdllm.errors import UserError
from fwdllm.proto.manifest import MANIFEST_FILE, load_manifest, load_theta, sha256_file

DEFAULT_REMOTE_DIR = "/data/local/tmp/fwdllm"
TERMUX_PYTHON = "/data/data/com.termux/files/usr/bin/python"
#: ABIs the device runtime has wheels for (onnxruntime, ai-edge-litert, numpy, grpcio).
RUNTIME_ABIS = ("arm64-v8a", "x86_64")
_UNAME_ABI = {
    "aarch64": "arm64-v8a",
    "arm64": "arm64-v8a",
    "x86_64": "x86_64",
    "armv7l": "armeabi-v7a",
    "armv8l": "armeabi-v7a",
    "i686": "x86",
}
#: ELF e_machine of each ABI, to refuse a benchmark_model built for another one.
_ELF_MACHINE = {"arm64-v8a": 183, "x86_64": 62, "armeabi-v7a": 40, "x86": 3}
_ELF_NAMES = {183: "aarch64", 62: "x86-64", 40: "32-bit ARM", 3: "x86"}
DELEGATE_FLAGS = {
    "cpu": ["--use_xnnpack=false"],
    "xnnpack": ["--use_xnnpack=true"],
    "gpu": ["--use_xnnpack=false", "--use_gpu=true"],
    "nnapi": ["--use_xnnpack=false", "--use_nnapi=true"],
}


class DeployError(UserError):
    """The device cannot take what deploy was asked to push, or a push went wrong."""


# ------------------------------------------------------------------ doctor

_PROPS = {
    "abi": "ro.product.cpu.abi",
    "abilist": "ro.product.cpu.abilist",
    "android": "ro.build.version.release",
    "sdk": "ro.build.version.sdk",
    "manufacturer": "ro.product.manufacturer",
    "model": "ro.product.model",
    "soc_manufacturer": "ro.soc.manufacturer",
    "soc_model": "ro.soc.model",
    "board": "ro.board.platform",
    "hardware": "ro.hardware",
    "egl": "ro.hardware.egl",
    "vulkan": "ro.hardware.vulkan",
}
#: Libraries whose presence tells which accelerators a phone exposes to native code.
_ACCEL_LIBS = {
    "gpu-opencl": ["/vendor/lib64/libOpenCL.so", "/system/vendor/lib64/libOpenCL.so", "/system/lib64/libOpenCL.so"],
    "gpu-vulkan": ["/system/lib64/libvulkan.so", "/usr/lib/aarch64-linux-gnu/libvulkan.so.1"],
    "nnapi": ["/system/lib64/libneuralnetworks.so"],
    "qnn-htp": ["/vendor/lib64/libQnnHtp.so", "/vendor/lib64/libcdsprpc.so"],
    "mediatek-apu": ["/vendor/lib64/libneuron_adapter.so", "/vendor/lib64/libapuwareapusys.so"],
    "dri-render-node": ["/dev/dri/renderD128"],
}


@dataclass
class DeviceInfo:
    serial: str
    abi: str
    abilist: list[str]
    os: str
    model: str
    soc: str
    accelerators: list[str]
    termux: bool
    python: str  # the device python deploy would use ("" when none)
    memory_mb: int | None
    props: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return self.__dict__.copy()


def probe(adb: Adb) -> DeviceInfo:
    """Ask the selected device what it is, in one shell round trip plus getprop calls."""
    entry = adb.select()
    listing = adb.getprops()
    props = {k: listing.get(v, "") for k, v in _PROPS.items()}
    checks = " ".join(
        f"[ -e {shlex.quote(p)} ] && echo lib:{name};" for name, paths in _ACCEL_LIBS.items() for p in paths
    )
    script = (
        f"{checks} echo uname:$(uname -m); echo kernel:$(uname -sr);"
        f" (pm list packages com.termux 2>/dev/null | grep -qx package:com.termux || [ -x {TERMUX_PYTHON} ]) && echo termux:yes;"
        f" for p in {TERMUX_PYTHON} python3 python; do command -v $p >/dev/null 2>&1 && echo python:$(command -v $p) && break; done;"
        " grep -m1 MemTotal /proc/meminfo 2>/dev/null;"
        " grep -m1 -E '^(Hardware|model name)' /proc/cpuinfo 2>/dev/null;"
        " . /etc/os-release 2>/dev/null && echo os:$PRETTY_NAME; true"
    )
    out = adb.shell_text(script)
    facts: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, _, value = line.partition(":")
        facts.setdefault(key.strip(), []).append(value.strip())
    abi = props["abi"] or _UNAME_ABI.get((facts.get("uname") or [""])[0], (facts.get("uname") or ["unknown"])[0])
    abilist = [a for a in props["abilist"].split(",") if a] or [abi]
    if props["android"]:
        os_name = f"Android {props['android']} (API {props['sdk']})"
    else:
        os_name = (facts.get("os") or facts.get("kernel") or ["unknown"])[0]
    accelerators = sorted(set(facts.get("lib", [])))
    if props["egl"]:
        accelerators.append(f"gpu-egl:{props['egl']}")
    if props["sdk"].isdigit() and int(props["sdk"]) >= 27 and "nnapi" not in accelerators:
        accelerators.append("nnapi")
    mem = facts.get("MemTotal")
    soc = " ".join(filter(None, [props["soc_manufacturer"], props["soc_model"] or props["board"] or props["hardware"]]))
    soc = soc or (facts.get("Hardware") or facts.get("model name") or ["unknown"])[0]
    return DeviceInfo(
        serial=entry.serial,
        abi=abi,
        abilist=abilist,
        os=os_name,
        model=" ".join(filter(None, [props["manufacturer"], props["model"]])) or entry.info.get("model", "unknown"),
        soc=soc,
        accelerators=accelerators,
        termux="yes" in facts.get("termux", []),
        python=(facts.get("python") or [""])[0],
        memory_mb=int(mem[0].split()[0]) // 1024 if mem else None,
        props={k: v for k, v in props.items() if v},
    )


def check_runtime_abi(info: DeviceInfo) -> None:
    if not set(info.abilist) & set(RUNTIME_ABIS):
        raise DeployError(
            f"device {info.serial} has ABI {info.abi} ({', '.join(info.abilist)}): fwdllm's device runtime "
            f"(onnxruntime, ai-edge-litert wheels) serves only {', '.join(RUNTIME_ABIS)}; use a 64-bit phone or board"
        )


def check_binary_abi(binary: Path, info: DeviceInfo) -> None:
    """Refuse a benchmark_model built for another CPU than the device's (ELF e_machine)."""
    head = binary.read_bytes()[:20]
    if head[:4] != b"\x7fELF":
        return  # a script (e.g. a wrapper); the device will say if it cannot run it
    machine = int.from_bytes(head[18:20], "little")
    if machine not in {_ELF_MACHINE.get(a) for a in info.abilist}:
        raise DeployError(
            f"{binary} is built for {_ELF_NAMES.get(machine, f'ELF machine {machine}')}, but device {info.serial} "
            f"is {info.abi}; use the android_aarch64 benchmark_model build for arm64-v8a"
        )


# ------------------------------------------------------------------ file sync


def remote_checksums(adb: Adb, remote_paths: list[str]) -> dict[str, str]:
    """sha256 of each remote file that exists (missing files are simply absent from the answer)."""
    found = {}
    for i in range(0, len(remote_paths), 64):
        part = remote_paths[i : i + 64]
        out = adb.shell(f"sha256sum {' '.join(shlex.quote(p) for p in part)} 2>/dev/null; true").stdout.decode()
        for line in out.splitlines():
            digest, _, name = line.partition("  ")
            if len(digest) == 64:
                found[name.strip()] = digest
    return found


@dataclass
class SyncReport:
    pushed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def sync_files(adb: Adb, files: list[tuple[Path, str]], desc: str = "push") -> SyncReport:
    """Push (local, remote) pairs whose remote sha256 differs, in order; verify each after the push."""
    report = SyncReport()
    local_sums = {remote: sha256_file(local) for local, remote in files}
    have = remote_checksums(adb, [remote for _, remote in files])
    todo = [(l, r) for l, r in files if have.get(r) != local_sums[r]]
    report.skipped = [r for _, r in files if have.get(r) == local_sums[r]]
    if todo:
        dirs = sorted({str(Path(r).parent) for _, r in todo})
        adb.shell("mkdir -p " + " ".join(shlex.quote(d) for d in dirs))
    total = sum(l.stat().st_size for l, _ in todo)
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not todo or not sys.stderr.isatty()) as bar:
        for local, remote in todo:
            try:
                adb.push(str(local), remote)
            except AdbError as exc:
                raise DeployError(
                    f"the connection dropped while pushing {local.name} ({exc}); run the same command again: "
                    "files already on the device with the right checksum are skipped"
                ) from exc
            after = remote_checksums(adb, [remote]).get(remote)
            if after != local_sums[remote]:
                raise DeployError(
                    f"{remote} on the device has checksum {after or 'none'} after the push, "
                    f"expected {local_sums[remote]}: the copy is partial; run deploy again"
                )
            report.pushed.append(remote)
            bar.update(local.stat().st_size)
    return report


# ------------------------------------------------------------------ deploy


def source_tree() -> Path | None:
    """The fwdllm source checkout this install runs from (editable install), if any."""
    import fwdllm

    root = Path(fwdllm.__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else None


def build_wheel(out_dir: Path) -> Path:
    """``pip wheel --no-deps`` of the fwdllm source tree into out_dir."""
    root = source_tree()
    if root is None:
        raise DeployError(
            "this fwdllm is not installed from a source checkout, so no wheel can be built; "
            "pass --runtime-wheel PATH to a fwdllm wheel"
        )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out_dir),
            str(root),
        ],
        capture_output=True,
        text=True,
    )
    wheels = sorted(out_dir.glob("fwdllm-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise DeployError(f"building the fwdllm wheel failed: {proc.stderr.strip()[-500:]}")
    return wheels[-1]


def read_device_state(adb: Adb, remote_dir: str) -> dict:
    text = adb.shell_text(f"cat {shlex.quote(remote_dir)}/device.json 2>/dev/null; true")
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}


def deploy(
    adb: Adb,
    remote_dir: str = DEFAULT_REMOTE_DIR,
    bundle: Path | None = None,
    runtime: bool = True,
    runtime_wheel: Path | None = None,
    wheelhouse: Path | None = None,
    benchmark_model: Path | None = None,
    remote_python: str | None = None,
    venv: bool = False,
) -> dict:
    """Push what was asked, install the runtime, record it in R/device.json; returns a report."""
    info = probe(adb)
    if runtime:
        check_runtime_abi(info)
    if benchmark_model is not None:
        if not benchmark_model.is_file():
            raise DeployError(f"--benchmark-model {benchmark_model} does not exist")
        check_binary_abi(benchmark_model, info)
    state = read_device_state(adb, remote_dir)
    R = remote_dir.rstrip("/")
    files: list[tuple[Path, str]] = []
    with tempfile.TemporaryDirectory(prefix="fwdllm-deploy-") as tmp:
        if bundle is not None:
            load_manifest(bundle)  # refuse to push a broken bundle
            names = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
            names = [n for n in names if n != MANIFEST_FILE] + [MANIFEST_FILE]
            files += [(bundle / n, f"{R}/bundle/{n}") for n in names]
        wheel = None
        if runtime:
            wheel = runtime_wheel or build_wheel(Path(tmp))
            files.append((wheel, f"{R}/wheels/{wheel.name}"))
            if wheelhouse is not None:
                files += [(w, f"{R}/wheels/{w.name}") for w in sorted(wheelhouse.glob("*.whl"))]
        if benchmark_model is not None:
            files.append((benchmark_model, f"{R}/bin/benchmark_model"))
        report = sync_files(adb, files, desc="deploy")
    if benchmark_model is not None:
        adb.shell(f"chmod 755 {shlex.quote(R + '/bin/benchmark_model')}")
        state["benchmark_model"] = f"{R}/bin/benchmark_model"
    if runtime:
        state["python"] = _install_runtime(
            adb, info, R, wheel.name, remote_python, venv, offline=wheelhouse is not None
        )
    state.update({"abi": info.abi, "serial": info.serial, "deployed_unix": int(time.time())})
    if bundle is not None:
        state["bundle"] = f"{R}/bundle"
    adb.shell(f"printf %s {shlex.quote(json.dumps(state))} > {shlex.quote(R + '/device.json')}")
    return {"device": info.to_json(), "pushed": report.pushed, "skipped": report.skipped, "state": state}


def _install_runtime(
    adb: Adb, info: DeviceInfo, R: str, wheel_name: str, remote_python: str | None, venv: bool, offline: bool
) -> str:
    """pip-install the pushed wheel with the device extra; returns the python that has it."""
    python = remote_python or info.python
    if not python:
        raise DeployError(
            f"device {info.serial} has no python: install Termux and `pkg install python`, "
            "or on a board `apt install python3-venv`; or pass --remote-python"
        )
    if venv:
        adb.shell(
            f"[ -x {R}/venv/bin/python ] || {shlex.quote(python)} -m venv --system-site-packages {R}/venv", timeout=1800
        )
        python = f"{R}/venv/bin/python"
    index = f"--no-index --find-links {R}/wheels" if offline else f"--find-links {R}/wheels"
    q = shlex.quote(python)
    # The wheel itself always replaces what is there (same version, new code); its dependencies only when missing.
    cmds = [
        f"{q} -m pip install -q --disable-pip-version-check --no-deps --force-reinstall {R}/wheels/{wheel_name}",
        f"{q} -m pip install -q --disable-pip-version-check {index} '{R}/wheels/{wheel_name}[device]'",
    ]
    for cmd in cmds:
        proc = adb.shell(cmd, check=False, timeout=3600)
        if proc.returncode != 0:
            raise DeployError(
                f"installing fwdllm[device] on the device failed: "
                f"{(proc.stderr or proc.stdout).decode(errors='replace').strip()[-800:]}"
            )
    return python


# ------------------------------------------------------------------ bench


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

    Rows ``[0, k)`` are θ + ε·v(seed_start+j) and rows ``[k, 2k)`` θ − ε·v(seed_start+j), the
    layout the forward-gradient engine feeds in training, so delegates are timed on real perturbed θ.
    """
    from fwdllm.device_runtime.backend import Example, Tokenizer
    from fwdllm.proto.perturbation import generate

    manifest = load_manifest(bundle)
    graph = manifest.graph("tflite", "full")
    if graph.theta_channel != "input":
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
    rows = np.empty((2 * k, dim), dtype=np.float32)
    for j, seed in enumerate(seeds):
        v = generate(seed, 0, dim) * np.float32(epsilon)
        rows[j], rows[k + j] = theta0 + v, theta0 - v
    rows = rows[:p]
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
        f"{doc['inputs']['graph']} ({doc['inputs']['precision']}), P={doc['inputs']['perturbations']} perturbed θ rows, "
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


# ------------------------------------------------------------------ run-client


def run_client(
    adb: Adb,
    port: int,
    remote_dir: str = DEFAULT_REMOTE_DIR,
    client_args: list[str] | None = None,
    data: Path | None = None,
    log_path: Path | None = None,
    duration: float | None = None,
    echo=print,
    stop: threading.Event | None = None,
) -> int:
    """Forward the coordinator port into the device, run `fwdllm device run` there, stream its log, stop it cleanly.

    The client is stopped on Ctrl-C here, after ``duration`` seconds, or when ``stop`` is set (e.g.
    by an ``echo`` callback that saw a log line). Returns the client's exit status, 130 when stopped.
    """
    info = probe(adb)
    R = remote_dir.rstrip("/")
    state = read_device_state(adb, R)
    if not state.get("python"):
        raise UserError(
            f"the device runtime is not deployed on {info.serial}: run `fwdllm android deploy --bundle B` first"
        )
    args = ["device", "run", "--coordinator", f"127.0.0.1:{port}", "--bundle", state.get("bundle", f"{R}/bundle")]
    if data is not None:
        sync_files(adb, [(data, f"{R}/data/{data.name}")], desc="data")
        args += ["--data", f"{R}/data/{data.name}"]
    args += list(client_args or [])
    pidfile = f"{R}/client.pid"
    command = (
        f"cd {shlex.quote(R)} && echo $$ > {pidfile} && exec {shlex.quote(state['python'])} -u -m fwdllm.cli -v "
        + " ".join(shlex.quote(a) for a in args)
    )
    adb.reverse(f"tcp:{port}", f"tcp:{port}")
    log = open(log_path, "a", encoding="utf-8") if log_path else None
    proc = adb.popen_shell(command)
    stop = stop or threading.Event()
    done, stopped = threading.Event(), threading.Event()

    def watch() -> None:
        deadline = None if duration is None else time.monotonic() + duration
        while not done.wait(0.2):
            if stop.is_set() or (deadline is not None and time.monotonic() >= deadline):
                stopped.set()
                _stop_remote(adb, pidfile)
                return

    watcher = threading.Thread(target=watch, name="fwdllm-run-client-stop", daemon=True)
    watcher.start()
    try:
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            echo(line)
            if log:
                log.write(line + "\n")
                log.flush()
        code = proc.wait()
    except KeyboardInterrupt:
        stopped.set()
        _stop_remote(adb, pidfile)
        code = proc.wait(timeout=30)
    finally:
        done.set()
        watcher.join(timeout=60)
        if proc.poll() is None:
            proc.kill()
        adb.reverse_remove(f"tcp:{port}")
        adb.shell(f"rm -f {pidfile}", check=False)
        if log:
            log.close()
    return 130 if stopped.is_set() and code != 0 else code


def _stop_remote(adb: Adb, pidfile: str, grace: float = 10.0) -> None:
    """SIGINT the device client (Ctrl-C: it stops between RPCs), then SIGTERM, then SIGKILL if it lingers."""
    for sig in ("INT", "TERM"):
        adb.shell(f"[ -f {pidfile} ] && kill -{sig} $(cat {pidfile}) 2>/dev/null; true", check=False)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            alive = adb.shell(
                f"[ -f {pidfile} ] && kill -0 $(cat {pidfile}) 2>/dev/null && echo alive; true", check=False
            )
            if b"alive" not in alive.stdout:
                return
            time.sleep(0.5)
    adb.shell(f"[ -f {pidfile} ] && kill -KILL $(cat {pidfile}) 2>/dev/null; true", check=False)
