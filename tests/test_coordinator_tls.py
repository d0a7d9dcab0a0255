"""TLS on both ends, with throwaway certificates: files that cannot work named at start-up, a device that
can never connect told why instead of retrying forever, client certificates (mTLS), and who sees GetStatus."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
from test_coordinator_fixtures import QuadraticDevice, make_bundle

from fwdllm.cli import main
from fwdllm.coordinator.config import from_dict
from fwdllm.coordinator.rounds import Coordinator
from fwdllm.coordinator.server import start
from fwdllm.device_runtime.client import ClientConfig
from fwdllm.device_runtime.connection import ClientError, RetryingCalls, open_channel
from fwdllm.proto.v1 import fwdllm_pb2 as pb
from fwdllm.proto.v1 import fwdllm_pb2_grpc as pb_grpc


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def signed(d: Path, name: str, ca: str, subject: str, san: str = "") -> None:
    """``name``.pem and ``name``.key: an EC key and its certificate signed by the CA ``ca``."""
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
            str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"), "-subj", subject)  # fmt: skip
    extra = []
    if san:
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        extra = ["-extfile", str(d / f"{name}.ext")]
    openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / f"{ca}.pem"), "-CAkey",
            str(d / f"{ca}.key"), "-CAcreateserial", "-out", str(d / f"{name}.pem"), "-days", "2", *extra)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """Two CAs; the coordinator's certificate (localhost) and a device's from ``ca``, a stranger's from ``other``."""
    if shutil.which("openssl") is None:
        pytest.fail("the TLS tests need the openssl command")
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "other"):
        key, cert = str(d / f"{ca}.key"), str(d / f"{ca}.pem")
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
                key, "-out", cert, "-days", "2", "-subj", f"/CN=test {ca}")  # fmt: skip
    signed(d, "server", "ca", "/CN=localhost", "DNS:localhost,IP:127.0.0.1")
    signed(d, "device", "ca", "/CN=device")
    signed(d, "stranger", "other", "/CN=stranger")
    (d / "garbage.pem").write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
    return d


class Device(RetryingCalls):
    """The device client's connection and retries, without a model: it only joins."""

    def __init__(self, port: int, fingerprint: str, **tls):
        self.cfg = ClientConfig(
            coordinator=f"localhost:{port}",
            bundle=Path("unused"),
            data=Path("unused"),
            backoff_s=(0.05, 0.2),
            rpc_timeout_s=5,
            **tls,
        )
        self.fingerprint, self.stats, self._stop = fingerprint, Counter(), threading.Event()
        self.channel = open_channel(self.cfg.coordinator, self.cfg.tls_ca, self.cfg.backoff_s, **tls_pair(tls))
        self.stub = pb_grpc.FwdLLMStub(self.channel)

    def join(self) -> pb.JoinResponse:
        request = pb.JoinRequest(
            protocol_version=pb.PROTOCOL_VERSION_1, enrolment_token="tok", model_fingerprint=self.fingerprint
        )
        return self._call("Join", lambda: request)


def tls_pair(tls: dict) -> dict:
    return {k: tls[k] for k in ("tls_cert", "tls_key") if k in tls}


@pytest.fixture()
def served(tmp_path, pki):
    """Start a coordinator over TLS with the given extra keywords; yields (coordinator, port)."""
    servers = []

    def _start(config: dict | None = None, **tls):
        coordinator = Coordinator(
            make_bundle(tmp_path / "bundle"), tmp_path / f"s{len(servers)}", from_dict(config or {})
        )
        coordinator.store.add_token("tok")
        server = start(coordinator, "127.0.0.1", 0, **tls)
        servers.append(server)
        return coordinator, server.port

    yield _start
    for s in servers:
        s.stop(0)


def test_tls_files_that_cannot_work_are_named_at_start_up(tmp_path, pki, capsys):
    def tls(cert: str, key: str, client_ca: str = "") -> list[str]:
        extra = ["--tls-client-ca", str(pki / client_ca)] if client_ca else []
        return ["--tls-cert", str(pki / cert), "--tls-key", str(pki / key), *extra]

    cases = [
        (tls("garbage.pem", "server.key"), "--tls-cert", "not a PEM certificate"),
        (tls("server.key", "server.key"), "--tls-cert", "not a PEM certificate"),
        (tls("server.pem", "device.key"), "--tls-key", "does not match --tls-cert"),
        (tls("server.pem", "garbage.pem"), "--tls-key", "not an unencrypted PEM private key"),
        (tls("server.pem", "server.key", "garbage.pem"), "--tls-client-ca", "not a PEM certificate"),
        (tls("absent.pem", "server.key"), "--tls-cert", "cannot read"),
    ]
    bundle = make_bundle(tmp_path / "bundle")
    for i, (args, option, why) in enumerate(cases):
        argv = ["coordinator", "serve", "--bundle", str(bundle), "--state", str(tmp_path / f"s{i}"), "--port", "0"]
        assert main([*argv, *args]) == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("fwdllm coordinator: error") and option in error and why in error, error
        assert "choose another" not in error


@pytest.mark.timeout(60)
def test_a_device_with_the_wrong_ca_exits_with_a_certificate_error(served, pki):
    coordinator, port = served(tls_cert=pki / "server.pem", tls_key=pki / "server.key")
    with pytest.raises(ClientError, match="does not verify"):
        Device(port, coordinator.fingerprint, tls_ca=pki / "other.pem").join()
    assert Device(port, coordinator.fingerprint, tls_ca=pki / "ca.pem").join().client_id


@pytest.mark.timeout(60)
def test_client_certificates_are_required_with_tls_client_ca(served, pki, capsys):
    tls = {"tls_cert": pki / "server.pem", "tls_key": pki / "server.key", "tls_client_ca": pki / "ca.pem"}
    coordinator, port = served(**tls)
    with pytest.raises(ClientError, match="requires a client certificate"):
        Device(port, coordinator.fingerprint, tls_ca=pki / "ca.pem").join()
    with pytest.raises(ClientError, match="refused this device's certificate"):
        Device(
            port,
            coordinator.fingerprint,
            tls_ca=pki / "ca.pem",
            tls_cert=pki / "stranger.pem",
            tls_key=pki / "stranger.key",
        ).join()
    device = Device(
        port, coordinator.fingerprint, tls_ca=pki / "ca.pem", tls_cert=pki / "device.pem", tls_key=pki / "device.key"
    )
    assert device.join().client_id and device.stats["retries"] == 0
    # The operator's status command presents a certificate too.
    status = ["coordinator", "status", "--address", f"localhost:{port}", "--tls-ca", str(pki / "ca.pem"), "--json"]
    mtls = ["--tls-cert", str(pki / "device.pem"), "--tls-key", str(pki / "device.key")]
    assert main([*status, *mtls, "--token", "tok"]) == 0
    assert json.loads(capsys.readouterr().out)["clients_registered"] == 1
    assert main(status) == 2
    assert "requires a client certificate" in capsys.readouterr().err


def test_get_status_in_full_only_with_a_token_unless_public(served, capsys):
    coordinator, port = served()
    address = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.FwdLLMStub(channel)
    QuadraticDevice(channel, 0).join("tok", coordinator.fingerprint)
    public = stub.GetStatus(pb.GetStatusRequest(), timeout=10)
    assert public.model_fingerprint == coordinator.fingerprint and public.theta_version == 1
    assert not public.counters and public.clients_registered == 0
    full = stub.GetStatus(pb.GetStatusRequest(), timeout=10, metadata=[("authorization", "Bearer tok")])
    assert full.counters == {"joined": 1} and full.clients_registered == 1
    with pytest.raises(grpc.RpcError) as info:
        stub.GetStatus(pb.GetStatusRequest(), timeout=10, metadata=[("authorization", "Bearer guess")])
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    again = stub.GetStatus(pb.GetStatusRequest(), timeout=10, metadata=[("authorization", "Bearer tok")])
    assert again.counters["rejected_token_unknown"] == 1
    channel.close()
    # The command: without --token the progress and a hint; with it, everything; a wrong one is named.
    assert main(["coordinator", "status", "--address", address]) == 0
    out = capsys.readouterr().out
    assert "step 0" in out and "pass --token" in out and "rejected" not in out
    assert main(["coordinator", "status", "--address", address, "--token", "tok"]) == 0
    assert "rejected_token_unknown" in capsys.readouterr().out
    assert main(["coordinator", "status", "--address", address, "--token", "guess"]) == 2
    assert "refused --token" in capsys.readouterr().err
    # status_access = "public": everything to anyone.
    coordinator, port = served({"server": {"status_access": "public"}})
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    QuadraticDevice(channel, 0).join("tok", coordinator.fingerprint)
    assert pb_grpc.FwdLLMStub(channel).GetStatus(pb.GetStatusRequest(), timeout=10).counters == {"joined": 1}
    channel.close()


@pytest.mark.timeout(120)
def test_failed_handshakes_leave_the_served_coordinators_log_quiet(tmp_path, pki):
    """Port scanners and devices with a wrong CA fail the TLS handshake; `serve` logs no line for each."""
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    argv = ["coordinator", "serve", "--bundle", str(make_bundle(tmp_path / "bundle")), "--state", str(tmp_path / "s")]
    argv += ["--port", "0", "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key")]
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "fwdllm.cli", *argv], stdout=out, stderr=out, env=env)
    try:
        while not (tmp_path / "s" / "endpoint").exists():
            assert server.poll() is None, log.read_text()
            time.sleep(0.05)
        port = int((tmp_path / "s" / "endpoint").read_text())
        wrong_ca = ssl.create_default_context(cafile=pki / "other.pem")
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", port)) as raw:
                raw.sendall(b"GET / HTTP/1.0\r\n\r\n")
                raw.recv(100)
            with socket.create_connection(("127.0.0.1", port)) as raw, pytest.raises(ssl.SSLCertVerificationError):
                wrong_ca.wrap_socket(raw, server_hostname="localhost")
    finally:
        server.terminate()
        server.wait(timeout=60)
    text = log.read_text()
    assert "listening on" in text and "Handshake failed" not in text and len(text.splitlines()) < 10, text[-2000:]
