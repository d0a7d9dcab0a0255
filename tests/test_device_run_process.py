"""`fwdllm device run` as a process: against `fwdllm coordinator serve`, over TLS, and stopped by a signal."""

from __future__ import annotations

import json
import time
from concurrent import futures

import grpc
import pytest
from device_standin import initial_theta
from mini_coordinator import (
    TOKEN,
    MiniCoordinator,
    bundle,  # noqa: F401 (fixture)
    client_for,
    data,  # noqa: F401 (fixture)
    make_task,
    serve,
)

from fwdllm.device_runtime.client import ClientError
from fwdllm.proto.manifest import load_manifest
from fwdllm.proto.v1 import fwdllm_pb2_grpc as pb_grpc


def test_fwdllm_device_run_against_fwdllm_coordinator_serve(bundle, data, tmp_path):
    """The two real commands end to end: `fwdllm coordinator serve` and `fwdllm device run`, separate processes."""
    import json
    import os
    import subprocess
    import sys

    config = tmp_path / "run.json"
    config.write_text(
        json.dumps(
            {
                "run": {
                    "steps": 2,
                    "clients_per_step": 1,
                    "perturbations_per_client": 4,
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
    )
    fwdllm = [sys.executable, "-m", "fwdllm.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen(
        [
            *fwdllm,
            "coordinator",
            "serve",
            "--bundle",
            str(bundle[0]),
            "--state",
            str(tmp_path / "state"),
            "--port",
            "0",
            "--config",
            str(config),
            "--token",
            TOKEN,
            "--exit-when-finished",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        line = server.stdout.readline()
        assert "listening on" in line, line
        address = line.strip().rsplit(" ", 1)[-1]
        device = subprocess.run(
            [
                *fwdllm,
                "device",
                "run",
                "--coordinator",
                address,
                "--bundle",
                str(bundle[0]),
                "--data",
                str(data),
                "--token",
                TOKEN,
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert device.returncode == 0, device.stderr[-2000:]
        stats = json.loads(device.stdout.strip().splitlines()[-1])
        assert stats["accepted"] == 2 and stats["rejected"] == 0 and stats["failed"] == 0
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_client_over_tls_with_the_coordinators_ca(bundle, data, tmp_path):
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.fail("the TLS test needs the openssl command")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(tmp_path / "key.pem"),
            "-out",
            str(tmp_path / "cert.pem"),
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    coord = MiniCoordinator(
        load_manifest(bundle[0]).fingerprint(), {1: initial_theta()}, [make_task("t0", 1, seeds=[1])]
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_FwdLLMServicer_to_server(coord, server)
    creds = grpc.ssl_server_credentials([((tmp_path / "key.pem").read_bytes(), (tmp_path / "cert.pem").read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        client = client_for(bundle, data, port, tls_ca=tmp_path / "cert.pem")
        assert client.run() == 0 and sorted(coord.results) == ["t0"]
        with pytest.raises(ClientError, match="--tls-ca"):
            client_for(bundle, data, port, tls_ca=tmp_path / "absent.pem")
    finally:
        server.stop(0)


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_signal_makes_fwdllm_device_run_submit_and_leave(bundle, data, signum):
    """Ctrl-C or SIGTERM: the device submits, leaves the run (its work is reassigned at once), exits 128 + signal."""
    import os
    import signal
    import subprocess
    import sys

    fingerprint = load_manifest(bundle[0]).fingerprint()
    coord = MiniCoordinator(fingerprint, {1: initial_theta(5)}, [make_task(f"t{i}", 1, seeds=[i]) for i in range(500)])
    coord.pull_delay_s = 0.05
    server, port = serve(coord)
    try:
        device = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fwdllm.cli",
                "device",
                "run",
                "--coordinator",
                f"127.0.0.1:{port}",
                "--bundle",
                str(bundle[0]),
                "--data",
                str(data),
                "--token",
                TOKEN,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        deadline = time.time() + 120
        while not coord.results and time.time() < deadline and device.poll() is None:
            time.sleep(0.05)
        assert coord.results, "the device never submitted a result"
        device.send_signal(getattr(signal, signum))
        out, err = device.communicate(timeout=60)
    finally:
        server.stop(0)
    assert device.returncode == 128 + getattr(signal, signum), err[-2000:]
    assert coord.left, "the device stopped without Leave"
    assert 0 < len(coord.results) < 500
    assert json.loads(out.strip().splitlines()[-1])["accepted"] == len(coord.results)
