"""Operator paths: TLS, `fwdllm coordinator token|status`, `fwdllm plot`, config errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
from test_coordinator_fixtures import LAYOUT, QuadraticDevice, make_bundle, write_config

from fwdllm.cli import main
from fwdllm.coordinator.config import from_dict, load_config
from fwdllm.coordinator.metrics import by_round, read_run
from fwdllm.coordinator.rounds import Coordinator
from fwdllm.coordinator.server import start
from fwdllm.coordinator.state import Store
from fwdllm.errors import UserError
from fwdllm.proto.manifest import Manifest, ModelInfo, PeftInfo, load_manifest, save_theta, write_manifest
from fwdllm.proto.names import Task
from fwdllm.proto.v1 import fwdllm_pb2 as pb
from fwdllm.proto.v1 import fwdllm_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.fail("the TLS test needs the openssl command (or the cryptography package)")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(d / "key.pem"),
            "-out",
            str(d / "cert.pem"),
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
    return d / "cert.pem", d / "key.pem"


def test_tls_server_with_a_self_signed_certificate(tmp_path, self_signed, capsys):
    cert, key = self_signed
    coordinator = Coordinator(make_bundle(tmp_path / "b"), tmp_path / "s", from_dict({"run": {"steps": 2}}))
    coordinator.store.add_token("tok")
    server = start(coordinator, "127.0.0.1", 0, tls_cert=cert, tls_key=key)
    try:
        secure = grpc.secure_channel(f"localhost:{server.port}", grpc.ssl_channel_credentials(cert.read_bytes()))
        device = QuadraticDevice(secure, 0)
        assert device.join("tok", coordinator.fingerprint).theta_dim == coordinator.dim
        plain = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.FwdLLMStub(plain).GetStatus(pb.GetStatusRequest(), timeout=3)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert (
            main(
                [
                    "coordinator",
                    "status",
                    "--address",
                    f"localhost:{server.port}",
                    "--tls-ca",
                    str(cert),
                    "--json",
                    "--token",
                    "tok",
                ]
            )
            == 0
        )
        status = json.loads(capsys.readouterr().out)
        assert status["clients_registered"] == 1 and status["theta_version"] == "1"
        secure.close(), plain.close()
    finally:
        server.stop(0)


def test_token_issue_and_revoke(tmp_path, capsys):
    assert main(["coordinator", "token", "--state", str(tmp_path)]) == 0
    token = capsys.readouterr().out.strip()
    store = Store(tmp_path)
    assert store.token_state(token) == "valid"
    assert main(["coordinator", "token", "--state", str(tmp_path), "--revoke", token]) == 0
    assert store.token_state(token) == "revoked"
    assert main(["coordinator", "token", "--state", str(tmp_path), "--revoke", "nope"]) == 2
    assert "no such token" in capsys.readouterr().err


def test_status_of_nothing_is_a_clear_error(capsys):
    assert main(["coordinator", "status", "--address", "127.0.0.1:1"]) == 2
    assert "no coordinator answered" in capsys.readouterr().err


def test_plot_draws_the_metrics(tmp_path):
    rows = [
        {
            "step": i,
            "loss": 1.0 / (i + 1),
            "accuracy": 0.5 + i / 40,
            "perturbations": 10 + i,
            "variance": 0.1,
            "lr": 0.01,
        }
        for i in range(10)
    ]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "curves.png"
    assert main(["plot", str(metrics), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5_000
    assert main(["plot", str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2


def test_plot_draws_a_simulation_and_a_baseline_on_one_figure_by_updates_applied(tmp_path):
    """A coordinator's row of step s follows s + 1 updates; a baseline's row of round r follows r rounds."""
    sim = tmp_path / "sim" / "state"
    sim.mkdir(parents=True)
    sim_rows = [{"step": s, "loss": 1.0 - s / 10, "accuracy": 0.5 + s / 20} for s in (-1, 0, 1, 2)]
    (sim / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sim_rows))
    base = tmp_path / "backprop"
    base.mkdir()
    base_rows = [
        {"step": r, "train_loss": 1.0 - r / 5, "heldout_loss": 1.1 - r / 5, "heldout_accuracy": 0.4 + r / 10}
        for r in (0, 1, 2, 3)
    ]
    (base / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in base_rows))

    name, rows = read_run(tmp_path / "sim")
    assert name == "sim" and [(r["round"], r["accuracy"]) for r in by_round(rows)] == [
        (s + 1, 0.5 + s / 20) for s in (-1, 0, 1, 2)
    ]
    name, rows = read_run(base)
    assert name == "backprop" and [(r["round"], r["accuracy"], r["eval_loss"], r["loss"]) for r in by_round(rows)] == [
        (r, 0.4 + r / 10, 1.1 - r / 5, 1.0 - r / 5) for r in (0, 1, 2, 3)
    ]
    out = tmp_path / "both.png"
    argv = ["plot", str(tmp_path / "sim"), str(base / "metrics.jsonl"), "--out", str(out)]
    assert main([*argv, "--labels", "fwdllm,backprop"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([*argv, "--labels", "only-one"]) == 2
    assert main(["plot", str(tmp_path), "--out", str(out)]) == 2  # a folder without metrics


def test_config_files_and_their_errors(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[run]\nsteps = 7\n[optimizer]\nname = "adam"\ngroups = [{match = "*.bias", lr_scale = 0.1}]\n')
    cfg = load_config(toml)
    assert cfg.run.steps == 7 and cfg.optimizer.name == "adam" and cfg.optimizer.groups[0]["lr_scale"] == 0.1
    for bad, message in [
        ({"run": {"stepz": 1}}, "unknown config key run.stepz"),
        ({"runn": {}}, "unknown config section"),
        ({"optimizer": {"name": "lion"}}, "optimizer.name"),
        ({"variance": {"mode": "sometimes"}}, "variance.mode"),
        ({"run": {"scheme": "backward"}}, r"run.scheme is 'backward'; use one of \['central', 'forward'\]"),
        ({"eval": {"backend": "tpu"}}, r"eval.backend is 'tpu'; use one of \['onnxruntime', 'litert', 'llama.cpp'\]"),
        ({"run": {"clients_per_step": 0}}, "at least 1"),
        ({"run": {"steps": "ten"}}, "run.steps must be an integer"),
        ({"sampler": {"enabled": 1}}, "true or false"),
        ({"optimizer": {"groups": "bias"}}, "optimizer.groups must be list"),
    ]:
        with pytest.raises(UserError, match=message):
            from_dict(bad)
    (tmp_path / "broken.toml").write_text("[run\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(tmp_path / "broken.toml")


def test_state_of_another_bundle_is_refused(tmp_path):
    Coordinator(make_bundle(tmp_path / "b"), tmp_path / "s", from_dict({})).close()
    other = make_bundle(tmp_path / "b2")
    (other / "theta.safetensors").unlink()
    save_theta(other / "theta.safetensors", LAYOUT, np.zeros(LAYOUT.dim, np.float32))
    write_manifest(
        other,
        Manifest(
            model=ModelInfo(source="x", architecture="q", task=Task.SEQ_CLS, max_seq_len=8, tokenizer="tokenizer.json"),
            peft=PeftInfo(method="bitfit", trainable_layers="all"),
            theta=LAYOUT,
            graphs=[],
        ),
    )
    with pytest.raises(UserError, match="belongs to another bundle"):
        Coordinator(other, tmp_path / "s", from_dict({}))


def test_serve_process_runs_to_the_end_and_exits(tmp_path):
    bundle = make_bundle(tmp_path / "b")
    config = write_config(
        tmp_path / "c.json",
        {
            "run": {"steps": 2, "clients_per_step": 1, "over_select": 0.0},
            "server": {"heartbeat_ms": 100, "rate_per_s": 1000},
        },
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fwdllm.cli",
            "coordinator",
            "serve",
            "--bundle",
            str(bundle),
            "--state",
            str(tmp_path / "s"),
            "--port",
            "0",
            "--config",
            str(config),
            "--token",
            "t",
            "--exit-when-finished",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        while not (tmp_path / "s" / "endpoint").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        channel = grpc.insecure_channel(f"127.0.0.1:{int((tmp_path / 's' / 'endpoint').read_text())}")
        device = QuadraticDevice(channel, 0)
        device.join("t", load_manifest(bundle).fingerprint())
        while not (reply := device.pull()).run_finished:
            if reply.WhichOneof("outcome") == "task":
                assert device.submit(reply.task, device.compute(reply.task)).accepted
        channel.close()
        assert proc.wait(timeout=30) == 0
        assert "listening on 127.0.0.1:" in proc.stdout.read().decode()
        assert len((tmp_path / "s" / "metrics.jsonl").read_text().splitlines()) == 2
    finally:
        if proc.poll() is None:
            proc.kill()
