"""What `fwdllm android` does to a phone or board over adb, one module per job:

- doctor (probe.py): what the device is;
- deploy (deploy.py): push the bundle, wheels and benchmark_model, install the runtime;
- bench (device_bench.py): time the TFLite graph per delegate on perturbed θ rows;
- run-client (remote_client.py): run `fwdllm device run` there against a local coordinator.
"""

from fwdllm.android_harness.deploy import (
    DEFAULT_REMOTE_DIR,
    DeployError,
    build_wheel,
    check_binary_abi,
    check_runtime_abi,
    deploy,
    read_device_state,
    remote_checksums,
    sync_files,
)
from fwdllm.android_harness.device_bench import bench, bench_inputs, bench_markdown, write_bench
from fwdllm.android_harness.probe import RUNTIME_ABIS, DeviceInfo, probe
from fwdllm.android_harness.remote_client import run_client

__all__ = [
    "DEFAULT_REMOTE_DIR",
    "RUNTIME_ABIS",
    "DeployError",
    "DeviceInfo",
    "bench",
    "bench_inputs",
    "bench_markdown",
    "build_wheel",
    "check_binary_abi",
    "check_runtime_abi",
    "deploy",
    "probe",
    "read_device_state",
    "remote_checksums",
    "run_client",
    "sync_files",
    "write_bench",
]
