"""`fwdllm android` against adb-shim devices that are plain host folders (no emulation, no phone).

The shim is the real executable (android_harness/bin/adb-shim) and runs every device
command for real with /bin/sh; only getprop answers from a table. The "device" python is a
venv that sees this checkout's installed packages through a .pth file, so deploy's pip
install of the fwdllm wheel really happens without downloading the heavy runtimes again.
"""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import reference_philox
from device_standin import TEXTS, shared_bundle, write_jsonl

from fwdllm.android_harness import harness
from fwdllm.android_harness.adb import Adb, AdbError
from fwdllm.cli import main
from fwdllm.proto.manifest import load_manifest, load_theta, sha256_file

SHIM = Path(harness.__file__).resolve().parent / "bin" / "adb-shim"
PHONE_PROPS = {
    "ro.product.cpu.abi": "x86_64",
    "ro.product.cpu.abilist": "x86_64,arm64-v8a",
    "ro.build.version.release": "14",
    "ro.build.version.sdk": "34",
    "ro.product.manufacturer": "Google",
    "ro.product.model": "Pixel 8",
    "ro.soc.manufacturer": "Google",
    "ro.soc.model": "Tensor G3",
    "ro.hardware.egl": "mali",
}


@pytest.fixture(scope="session")
def bundle():
    return shared_bundle()[0]


@pytest.fixture(scope="session")
def device_python(tmp_path_factory):
    """A python for the host-folder device: its own site-packages first, this venv's behind it."""
    root = tmp_path_factory.mktemp("devpy")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    site = next(root.glob("lib/python3*/site-packages"))
    host_site = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "numpy").is_dir())
    (site / "host-venv.pth").write_text(host_site + "\n")
    return str(root / "bin" / "python")


@pytest.fixture(scope="session")
def runtime_wheel(tmp_path_factory):
    return harness.build_wheel(tmp_path_factory.mktemp("wheel"))


class Shim:
    """The shim's device table for one test, and an Adb client on it."""

    def __init__(self, tmp: Path, monkeypatch, devices: list[dict]):
        self.tmp, self.config = tmp, tmp / "shim.json"
        self.devices = devices
        self.write()
        monkeypatch.setenv("FWDLLM_ADB_SHIM_CONFIG", str(self.config))
        monkeypatch.setenv("ADB", str(SHIM))

    def write(self):
        self.config.write_text(json.dumps({"state_dir": str(self.tmp / "state"), "devices": self.devices}))

    def adb(self, serial=None) -> Adb:
        return Adb(str(SHIM), serial)


def phone(tmp: Path, serial="phone-1", **props) -> dict:
    root = tmp / serial
    root.mkdir(exist_ok=True)
    return {"serial": serial, "mode": "dir", "root": str(root), "props": {**PHONE_PROPS, **props}}


@pytest.fixture
def one_phone(tmp_path, monkeypatch):
    return Shim(tmp_path, monkeypatch, [phone(tmp_path)])


def remote(tmp_path, serial="phone-1") -> str:
    return str(tmp_path / serial / "fwdllm")


# ---------------------------------------------------------------- doctor and device selection


def test_doctor_reports_the_device(one_phone, capsys):
    assert main(["android", "doctor", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    dev = doc["device"]
    assert dev["serial"] == "phone-1" and dev["abi"] == "x86_64" and dev["os"] == "Android 14 (API 34)"
    assert dev["soc"] == "Google Tensor G3" and dev["model"] == "Google Pixel 8"
    assert "nnapi" in dev["accelerators"] and "gpu-egl:mali" in dev["accelerators"]
    assert dev["termux"] is False
    assert dev["memory_mb"] > 0  # read on the "device" from /proc/meminfo


def test_no_device_is_a_clear_error(tmp_path, monkeypatch, capsys):
    Shim(tmp_path, monkeypatch, [])
    assert main(["android", "doctor"]) == 2
    err = capsys.readouterr().err
    assert "no device attached" in err and "USB debugging" in err and "Traceback" not in err


def test_several_devices_need_serial(tmp_path, monkeypatch, capsys):
    shim = Shim(tmp_path, monkeypatch, [phone(tmp_path, "a"), phone(tmp_path, "b")])
    assert main(["android", "doctor"]) == 2
    assert "choose one with --serial" in capsys.readouterr().err
    assert main(["android", "doctor", "--serial", "b", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["device"]["serial"] == "b"
    with pytest.raises(AdbError, match="no device with serial 'c'"):
        shim.adb("c").select()


def test_unauthorized_device_says_how_to_fix(tmp_path, monkeypatch):
    shim = Shim(tmp_path, monkeypatch, [{**phone(tmp_path), "state": "unauthorized"}])
    with pytest.raises(AdbError, match="Allow USB debugging"):
        shim.adb("phone-1").select()


def test_missing_adb(capsys):
    assert main(["android", "doctor", "--adb", "/nonexistent/adb"]) == 2
    assert "apt-get install adb" in capsys.readouterr().err


def test_shim_speaks_adb(one_phone, tmp_path):
    """The executable itself: getprop KEY, shell exit status, push/pull round trip, reverse bookkeeping."""
    adb = one_phone.adb()
    assert adb.run("shell", "getprop", "ro.soc.model").stdout.strip() == b"Tensor G3"
    assert adb.shell("exit 7", check=False).returncode == 7
    src = tmp_path / "blob.bin"
    src.write_bytes(os.urandom(5000))
    adb.push(str(src), f"{remote(tmp_path)}/x/blob.bin")
    adb.run("pull", f"{remote(tmp_path)}/x/blob.bin", str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
    adb.reverse("tcp:6000", "tcp:6000")
    assert adb.run("reverse", "--list").stdout.split()[1:] == [b"tcp:6000", b"tcp:6000"]
    adb.reverse_remove("tcp:6000")
    assert adb.run("reverse", "--list").stdout == b""
    with pytest.raises(AdbError, match="same port"):
        adb.reverse("tcp:6000", "tcp:6001")


# ---------------------------------------------------------------- deploy


def test_abi_the_runtime_cannot_serve(tmp_path, monkeypatch, bundle):
    shim = Shim(
        tmp_path,
        monkeypatch,
        [phone(tmp_path, **{"ro.product.cpu.abi": "armeabi-v7a", "ro.product.cpu.abilist": "armeabi-v7a,armeabi"})],
    )
    with pytest.raises(harness.DeployError, match="armeabi-v7a.*serves only arm64-v8a, x86_64"):
        harness.deploy(shim.adb(), remote(tmp_path), bundle=bundle)
    assert not Path(remote(tmp_path)).exists()  # refused before anything was pushed


def test_benchmark_binary_for_another_abi(tmp_path, monkeypatch):
    shim = Shim(
        tmp_path,
        monkeypatch,
        [phone(tmp_path, **{"ro.product.cpu.abi": "arm64-v8a", "ro.product.cpu.abilist": "arm64-v8a"})],
    )
    host_binary = Path("/bin/true").resolve()  # an x86-64 ELF
    with pytest.raises(harness.DeployError, match="built for x86-64.*android_aarch64"):
        harness.deploy(shim.adb(), remote(tmp_path), runtime=False, benchmark_model=host_binary)


def test_dropped_connection_mid_deploy_resumes(tmp_path, monkeypatch, bundle):
    dev = phone(tmp_path)
    shim = Shim(tmp_path, monkeypatch, [dev])
    names = sorted(p.name for p in bundle.iterdir())
    big = max(names, key=lambda n: (bundle / n).stat().st_size)
    # Let the small files through, then cut the link 1000 bytes into the biggest graph.
    dev["faults"] = {"drop_push_after_bytes": 1000}
    first = [n for n in names if n != "manifest.json" and n < big]
    harness.sync_files(shim.adb(), [(bundle / n, f"{remote(tmp_path)}/bundle/{n}") for n in first])
    shim.write()
    with pytest.raises(harness.DeployError, match="connection dropped while pushing .*run the same command again"):
        harness.deploy(shim.adb(), remote(tmp_path), bundle=bundle, runtime=False)
    on_device = Path(remote(tmp_path)) / "bundle"
    partial = next(p for p in on_device.iterdir() if p.stat().st_size == 1000)
    assert sha256_file(partial) != sha256_file(bundle / partial.name)
    assert not (on_device / "manifest.json").exists()  # pushed last: the half bundle is not a bundle

    report = harness.deploy(shim.adb(), remote(tmp_path), bundle=bundle, runtime=False)
    assert set(report["skipped"]) == {f"{remote(tmp_path)}/bundle/{n}" for n in first}
    assert f"{remote(tmp_path)}/bundle/{partial.name}" in report["pushed"]
    load_manifest(on_device)  # every checksum of the manifest holds on the device copy
    again = harness.deploy(shim.adb(), remote(tmp_path), bundle=bundle, runtime=False)
    assert again["pushed"] == [] and len(again["skipped"]) == len(names)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, bundle, device_python, runtime_wheel):
    """One phone with the bundle and the runtime deployed, shared by the tests that only read it."""
    tmp = tmp_path_factory.mktemp("deployed")
    with pytest.MonkeyPatch.context() as mp:
        shim = Shim(tmp, mp, [phone(tmp)])
        report = harness.deploy(
            shim.adb(), remote(tmp), bundle=bundle, runtime_wheel=runtime_wheel, remote_python=device_python
        )
        yield shim, report


def test_deploy_installs_the_wheel_on_the_device(deployed, device_python):
    shim, report = deployed
    tmp_path = shim.tmp
    state = json.loads((Path(remote(tmp_path)) / "device.json").read_text())
    assert state["python"] == device_python and state["bundle"] == f"{remote(tmp_path)}/bundle"
    where = shim.adb().shell_text(
        f"cd {remote(tmp_path)} && {device_python} -c "
        "'import fwdllm.android_harness.benchmark_model as m; print(m.__file__)'"
    )
    assert where.startswith(str(Path(device_python).parents[1]))  # the wheel's copy, not this checkout


# ---------------------------------------------------------------- bench


def test_bench_per_delegate_with_perturbed_theta(deployed, bundle, tmp_path):
    shim, _ = deployed
    out, tmp_path = tmp_path / "out", shim.tmp
    doc = harness.bench(
        shim.adb(),
        bundle,
        remote(tmp_path),
        ("cpu", "xnnpack", "gpu"),
        qnn_delegate="/vendor/lib64/libQnnTFLiteDelegate.so",
        num_runs=3,
        warmup_runs=1,
        epsilon=0.01,
        seed_start=7,
    )
    rows = {r["delegate"]: r for r in doc["rows"]}
    assert rows["cpu"]["status"] == "ok" and rows["cpu"]["avg_us"] > 0
    assert rows["xnnpack"]["status"] == "ok" and rows["xnnpack"]["delegate_kernels"] >= 1
    assert rows["gpu"]["status"] == "not-applied" and "unsupported" in rows["gpu"]["message"]
    assert rows["qnn"]["status"] == "failed" and "Failed to apply EXTERNAL delegate" in rows["qnn"]["message"]

    # The θ rows pushed are θ0 ± ε·v(seed), v recomputed here by the independent pure-Python Philox.
    manifest = load_manifest(bundle)
    theta0 = load_theta(bundle, manifest)
    p, dim = doc["inputs"]["perturbations"], manifest.theta.dim
    fed = np.fromfile(Path(remote(tmp_path)) / "bench" / "theta.bin", dtype="<f4").reshape(p, dim)
    for j, seed in enumerate(doc["inputs"]["seeds"]):
        v = np.array([reference_philox.gaussian(seed, i) for i in range(dim)], dtype=np.float32)
        np.testing.assert_allclose(fed[j], theta0 + np.float32(0.01) * v, rtol=0, atol=1e-6)
        np.testing.assert_allclose(fed[p // 2 + j], theta0 - np.float32(0.01) * v, rtol=0, atol=1e-6)
    assert doc["inputs"]["seeds"] == [7, 8]

    js, md = harness.write_bench(doc, out)
    assert json.loads(js.read_text())["rows"][3]["delegate"] == "qnn"
    table = md.read_text()
    assert "| xnnpack | ok |" in table and "| qnn | failed |" in table


def test_bench_with_a_deployed_benchmark_binary(one_phone, tmp_path, bundle, capsys):
    # A benchmark_model stand-in for this x86-64 "phone": a script (not ELF, so no ABI check) running our runner.
    tool = tmp_path / "benchmark_model"
    tool.write_text(f'#!/bin/sh\nexec {sys.executable} -m fwdllm.android_harness.benchmark_model "$@"\n')
    assert main(["android", "deploy", "--remote-dir", remote(tmp_path), "--no-runtime"]) == 2
    assert "nothing to deploy" in capsys.readouterr().err
    assert (
        main(["android", "deploy", "--remote-dir", remote(tmp_path), "--no-runtime", "--benchmark-model", str(tool)])
        == 0
    )
    assert os.access(Path(remote(tmp_path)) / "bin" / "benchmark_model", os.X_OK)
    doc = harness.bench(one_phone.adb(), bundle, remote(tmp_path), ("xnnpack",), num_runs=2, warmup_runs=1)
    assert doc["runner"] == f"{remote(tmp_path)}/bin/benchmark_model"
    assert doc["rows"][0]["status"] == "ok"


def test_bench_cli_and_unknown_delegate(deployed, tmp_path, bundle, capsys, monkeypatch):
    shim, _ = deployed
    monkeypatch.setenv("FWDLLM_ADB_SHIM_CONFIG", str(shim.config))
    monkeypatch.setenv("ADB", str(SHIM))
    base = ["android", "bench", "--bundle", str(bundle), "--remote-dir", remote(shim.tmp), "--out", str(tmp_path / "o")]
    assert main(base + ["--delegates", "cpu,tpu"]) == 2
    assert "unknown delegate(s) ['tpu']" in capsys.readouterr().err
    assert main(base + ["--delegates", "cpu", "--num-runs", "2"]) == 0
    assert "| cpu | ok |" in capsys.readouterr().out


def test_bench_before_deploy_says_deploy(one_phone, tmp_path, bundle):
    with pytest.raises(Exception, match="fwdllm android deploy"):
        harness.bench(one_phone.adb(), bundle, remote(tmp_path), ("cpu",))


# ---------------------------------------------------------------- run-client


def _coordinator(bundle, state, steps):
    from fwdllm.coordinator.config import from_dict
    from fwdllm.coordinator.rounds import Coordinator
    from fwdllm.coordinator.server import start

    config = from_dict(
        {
            "run": {
                "steps": steps,
                "clients_per_step": 1,
                "perturbations_per_client": 2,
                "min_clients": 1,
                "over_select": 0.0,
                "batch_size": 4,
                "deadline_s": 60,
            },
            "optimizer": {"name": "sgd", "lr": 0.1},
            "aggregation": {"threads": 1},
            "server": {"heartbeat_ms": 200},
        }
    )
    coordinator = Coordinator(bundle, state, config)
    coordinator.store.add_token("tok")
    return coordinator, start(coordinator, "127.0.0.1", 0)


def test_run_client_through_adb_reverse(deployed, bundle, tmp_path):
    shim, _ = deployed
    coordinator, server = _coordinator(bundle, tmp_path / "state", steps=2)
    data = write_jsonl(tmp_path / "local.jsonl", [{"text": t, "label": lab} for t, lab in TEXTS])
    lines = []
    try:
        code = harness.run_client(
            shim.adb(),
            server.port,
            remote(shim.tmp),
            ["--token", "tok", "--name", "phone"],
            data=data,
            log_path=tmp_path / "client.log",
            echo=lines.append,
        )
        assert code == 0 and coordinator.meta("finished")
        assert coordinator.store.query("SELECT count(*) FROM history")[0][0] == 2  # two steps applied
    finally:
        server.stop(0)
    assert any("joined 127.0.0.1:" in line for line in lines) and any("run is finished" in line for line in lines)
    assert (tmp_path / "client.log").read_text().splitlines() == lines  # streamed back and kept
    assert shim.adb().run("reverse", "--list").stdout.strip() == b""  # the forward is removed again
    assert not (Path(remote(shim.tmp)) / "client.pid").exists()


def test_run_client_is_stopped_cleanly(deployed, bundle, tmp_path):
    shim, _ = deployed
    coordinator, server = _coordinator(bundle, tmp_path / "state", steps=10_000)
    data = write_jsonl(tmp_path / "local.jsonl", [{"text": t, "label": lab} for t, lab in TEXTS])
    lines, joined = [], threading.Event()

    def echo(line):  # stop once the client is serving, however long this loaded machine takes to get there
        lines.append(line)
        if "joined 127.0.0.1:" in line:
            joined.set()

    try:
        code = harness.run_client(
            shim.adb(), server.port, remote(shim.tmp), ["--token", "tok"], data=data, echo=echo, stop=joined
        )
        assert code == 130 and any("interrupted" in line for line in lines), "\n".join(lines[-20:])
        assert not coordinator.meta("finished")
    finally:
        server.stop(0)
    assert not (Path(remote(shim.tmp)) / "client.pid").exists()
