"""deploy: push the bundle, the runtime wheel and benchmark_model to a phone or board, and install the runtime.

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
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from fwdllm.android_harness.adb import Adb, AdbError
from fwdllm.android_harness.probe import RUNTIME_ABIS, DeviceInfo, probe
from fwdllm.errors import UserError
from fwdllm.proto.manifest import MANIFEST_FILE, load_manifest, sha256_file

DEFAULT_REMOTE_DIR = "/data/local/tmp/fwdllm"
_ELF_MACHINE = {"arm64-v8a": 183, "x86_64": 62, "armeabi-v7a": 40, "x86": 3}
_ELF_NAMES = {183: "aarch64", 62: "x86-64", 40: "32-bit ARM", 3: "x86"}


class DeployError(UserError):
    """The device cannot take what deploy was asked to push, or a push went wrong."""


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
    todo = [(local, r) for local, r in files if have.get(r) != local_sums[r]]
    report.skipped = [r for _, r in files if have.get(r) == local_sums[r]]
    if todo:
        dirs = sorted({str(Path(r).parent) for _, r in todo})
        adb.shell("mkdir -p " + " ".join(shlex.quote(d) for d in dirs))
    total = sum(local.stat().st_size for local, _ in todo)
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


# ------------------------------------------------------------------ install


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
    if wheel is not None:  # set exactly when runtime is
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
