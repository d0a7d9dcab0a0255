"""The ARM path on emulated aarch64: `make test-arm64` (slow; needs root for chroot).

android_harness/rootfs.sh builds (or reuses) a Debian arm64 root filesystem run through
qemu-user-static and an aarch64 wheelhouse of the device extra. adb-shim serves that root
as a device; the harness deploys the runtime there (a real pip install of the aarch64
wheels, offline), and the tests compare what the aarch64 runtime computes with what this
x86-64 machine computes for the same seeds, batch and θ.
"""

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from device_standin import TEXTS, shared_bundle, write_jsonl

from fwdllm.android_harness import harness
from fwdllm.android_harness.adb import Adb
from fwdllm.proto.perturbation import generate

pytestmark = pytest.mark.arm64

SHIM = Path(harness.__file__).resolve().parent / "bin" / "adb-shim"
CACHE = Path(os.environ.get("FWDLLM_CACHE", Path.home() / ".cache" / "fwdllm"))
ROOTFS = Path(os.environ.get("FWDLLM_ARM64_ROOTFS", CACHE / "arm64-rootfs"))
WHEELS = Path(os.environ.get("FWDLLM_ARM64_WHEELS", CACHE / "arm64-wheels"))
R = "/opt/fwdllm"  # the remote dir, inside the root filesystem

JVP_SCRIPT = """
import json, platform, sys
from fwdllm.device_runtime.backend import open_backend
from fwdllm.device_runtime.examples import load_examples
from fwdllm.device_runtime.engine import forward_gradients
from fwdllm.proto.manifest import load_manifest, load_theta
bundle, data, name, seeds = sys.argv[1], sys.argv[2], sys.argv[3], [int(s) for s in sys.argv[4].split(",")]
manifest = load_manifest(bundle)
backend = open_backend(bundle, name, options={"threads": 1})
batch = backend.tokenizer().batch(load_examples(data, manifest)[:4])
r = forward_gradients(backend, batch, load_theta(bundle, manifest), seeds, epsilon=0.01)
print(json.dumps({"machine": platform.machine(), "jvp": [float(x) for x in r.jvp], "loss": r.loss_mean}))
"""


@pytest.fixture(scope="module")
def device(tmp_path_factory):
    """The emulated board, with the stand-in bundle and the runtime deployed through the harness."""
    for need, what in ((ROOTFS / ".fwdllm-rootfs-ready", "root filesystem"), (WHEELS / ".complete", "wheelhouse")):
        if not need.exists():
            pytest.fail(f"the aarch64 {what} is missing ({need}); run android_harness/rootfs.sh (make test-arm64 does)")
    tmp = tmp_path_factory.mktemp("arm64")
    config = tmp / "shim.json"
    config.write_text(
        json.dumps(
            {
                "state_dir": str(tmp / "state"),
                "devices": [{"serial": "emu-arm64", "mode": "chroot", "root": str(ROOTFS)}],
            }
        )
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FWDLLM_ADB_SHIM_CONFIG", str(config))
        adb = Adb(str(SHIM))
        started = time.perf_counter()
        report = harness.deploy(
            adb, R, bundle=shared_bundle()[0], wheelhouse=WHEELS, remote_python="python3", venv=True
        )
        print(
            f"\ndeploy to emulated aarch64: {time.perf_counter() - started:.1f} s, "
            f"{len(report['pushed'])} pushed, {len(report['skipped'])} skipped"
        )
        data = write_jsonl(tmp / "local.jsonl", [{"text": t, "label": lab} for t, lab in TEXTS])
        script = tmp / "jvp_check.py"
        script.write_text(JVP_SCRIPT)
        harness.sync_files(adb, [(data, f"{R}/data/local.jsonl"), (script, f"{R}/jvp_check.py")])
        yield adb, report, data, tmp


def test_device_is_aarch64(device):
    adb, report, _, _ = device
    assert report["device"]["abi"] == "arm64-v8a" and report["state"]["python"] == f"{R}/venv/bin/python"
    assert adb.shell_text(f"{R}/venv/bin/python -c 'import platform; print(platform.machine())'") == "aarch64"
    assert platform.machine() == "x86_64"


@pytest.mark.parametrize(
    "dist,seed,offset,count",
    [
        ("gaussian", 0, 0, 4096),
        ("gaussian", (3 << 32) | 17, 123_457, 2048),
        ("gaussian", 2**64 - 1, 10**9, 512),
        ("rademacher", 42, 0, 4096),
        ("rademacher", 7, 999, 300),
        ("sparse-gaussian-0.1", (5 << 32) | 2, 77_777, 4096),
    ],
)
def test_perturbations_are_bit_exact_on_aarch64(device, dist, seed, offset, count):
    adb = device[0]
    out = adb.shell_text(
        f"{R}/venv/bin/python -m fwdllm.cli perturb --seed {seed} --offset {offset} "
        f"--count {count} --dist {dist} --json"
    )
    arm = json.loads(out)
    host = generate(seed, offset, count, dist)
    assert arm["bits"] == [f"{b:08x}" for b in host.view("<u4").tolist()]


@pytest.mark.parametrize("backend", ["onnxruntime", "litert"])
def test_jvp_scalars_match_x86(device, backend):
    adb, _, data, tmp = device
    seeds = [5, 6, (1 << 32) | 3, 99]
    arm = json.loads(
        adb.shell_text(
            f"cd {R} && {R}/venv/bin/python jvp_check.py {R}/bundle {R}/data/local.jsonl "
            f"{backend} {','.join(map(str, seeds))}"
        ).splitlines()[-1]
    )
    script = tmp / "jvp_check.py"
    host = json.loads(
        subprocess.run(
            [sys.executable, str(script), str(shared_bundle()[0]), str(data), backend, ",".join(map(str, seeds))],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()[-1]
    )
    assert arm["machine"] == "aarch64" and host["machine"] == "x86_64"
    jarm, jhost = np.array(arm["jvp"]), np.array(host["jvp"])
    print(f"\n{backend}: jvp aarch64 {jarm} x86-64 {jhost}, max |diff| {np.abs(jarm - jhost).max():.3g}")
    # Different SIMD kernels (NEON vs AVX) round losses differently in the last bits; the central
    # difference divides that by 2ε, so the scalars agree to ~1e-4 of their scale, not bit for bit.
    np.testing.assert_allclose(jarm, jhost, rtol=0, atol=1e-3 * max(1.0, np.abs(jhost).max()))
    assert abs(arm["loss"] - host["loss"]) < 1e-5


def test_bench_on_aarch64(device, tmp_path):
    adb = device[0]
    doc = harness.bench(adb, shared_bundle()[0], R, ("cpu", "xnnpack", "gpu"), num_runs=5, warmup_runs=1)
    rows = {r["delegate"]: r for r in doc["rows"]}
    print("\n" + harness.bench_markdown(doc))
    assert rows["cpu"]["status"] == "ok" and rows["cpu"]["avg_us"] > 0
    # Under qemu-user, cpuinfo cannot read /sys (left unmounted: host sysfs crashes onnxruntime), and
    # XNNPACK then declines every node: the row must say so rather than pass CPU timings off as XNNPACK's.
    assert rows["xnnpack"]["status"] in ("ok", "not-applied") and rows["xnnpack"]["avg_us"] > 0
    if rows["xnnpack"]["status"] == "not-applied":
        assert "took no part" in rows["xnnpack"]["message"]
    assert rows["gpu"]["status"] == "not-applied"


def test_client_runs_steps_on_aarch64(device, tmp_path):
    from fwdllm.coordinator.config import from_dict
    from fwdllm.coordinator.rounds import Coordinator
    from fwdllm.coordinator.server import start

    adb, _, data, _ = device
    config = from_dict(
        {
            "run": {
                "steps": 3,
                "clients_per_step": 1,
                "perturbations_per_client": 4,
                "min_clients": 1,
                "over_select": 0.0,
                "batch_size": 4,
                "deadline_s": 300,
            },
            "optimizer": {"name": "sgd", "lr": 0.1},
            "aggregation": {"threads": 1},
            "server": {"heartbeat_ms": 1000},
        }
    )
    coordinator = Coordinator(shared_bundle()[0], tmp_path / "state", config)
    coordinator.store.add_token("tok")
    server = start(coordinator, "127.0.0.1", 0)
    lines = []
    try:
        started = time.perf_counter()
        code = harness.run_client(
            adb, server.port, R, ["--token", "tok", "--name", "emu-arm64"], data=data, echo=lines.append
        )
        print(f"\n3 steps on emulated aarch64 in {time.perf_counter() - started:.1f} s")
        assert code == 0 and coordinator.meta("finished"), "\n".join(lines[-20:])
        assert coordinator.store.query("SELECT count(*) FROM history")[0][0] == 3
        caps = json.loads(coordinator.store.query("SELECT capabilities FROM clients")[0][0] or "{}")
        assert "aarch64" in json.dumps(caps) or "arm64" in json.dumps(caps)
    finally:
        server.stop(0)
