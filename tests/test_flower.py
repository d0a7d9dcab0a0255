"""fwdllm on Flower's Simulation Engine: the same θ as fwdllm's own simulation, and 100 virtual clients learning.

Real Flower (the Simulation Runtime on a local Ray instance), real bundles, BBC News partitions.
"""

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fwdllm.proto.manifest import load_manifest, load_theta
from fwdllm.proto.names import VarianceMode
from fwdllm.simulate import SimConfig, simulate
from fwdllm.simulate_inprocess import run

pytest.importorskip("flwr")
pytest.importorskip("ray")


@pytest.fixture(scope="session")
def tiny_head(tmp_path_factory):
    from export_helpers import export_head_bundle, tiny_checkpoint

    root = tmp_path_factory.mktemp("flower-tiny")
    return export_head_bundle(root / "bundle", tiny_checkpoint("bert", root / "ckpt"))


def _theta(run_dir: Path, bundle: Path) -> np.ndarray:
    return load_manifest(bundle).theta.flatten(load_file(str(run_dir / "theta.safetensors")))


def _rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "state" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["step"] >= 0]


@pytest.mark.parametrize(
    "settings",
    [
        # plain SGD: nodes rebuild θ from the update history; variance control adds waves; the sampler picks seeds
        {"variance": VarianceMode.RELATIVE, "max_waves": 2, "sampler": True},
        # Adam is not replayable: nodes receive θ itself
        {"optimizer": "adam", "lr": 0.01},
    ],
    ids=["sgd-waves-sampler", "adam"],
)
def test_flower_ends_on_the_theta_of_the_inprocess_simulation(tiny_head, tmp_path, settings):
    base = {"lr": 0.05, **settings}
    cfg = SimConfig(
        bundle=str(tiny_head),
        data="bbc",
        clients=4,
        per_step=2,
        steps=3,
        perturbations=3,
        eval_every=3,
        eval_limit=8,
        engine="flower",
        **base,
    )
    summary = simulate(cfg, tmp_path / "flower", progress=False)
    reference = run(
        SimConfig(
            bundle=str(tiny_head),
            data="bbc",
            clients=4,
            per_step=2,
            steps=3,
            perturbations=3,
            eval_every=3,
            eval_limit=8,
            **base,
        ),
        progress=False,
    )

    assert summary["steps"] == 3
    theta = _theta(tmp_path / "flower", tiny_head)
    assert not np.array_equal(theta, load_theta(tiny_head, load_manifest(tiny_head)))
    # within float32 rounding of θ's magnitude (here: bit for bit, both apply the update rule in one order)
    np.testing.assert_allclose(theta, reference.theta, rtol=0, atol=4 * np.finfo(np.float32).eps * np.abs(theta).max())
    flower_rows = _rows(tmp_path / "flower")
    assert [r["waves"] for r in flower_rows] == [r["waves"] for r in reference.rows]
    assert [r["perturbations"] for r in flower_rows] == [r["perturbations"] for r in reference.rows]
    down_flower, down_ref = sum(r["bytes_down"] for r in flower_rows), sum(r["bytes_down"] for r in reference.rows)
    if "optimizer" in settings:
        assert down_flower >= down_ref  # θ itself every step, after a refused history request (as over gRPC)
    else:
        assert down_flower < down_ref  # history replay instead of θ after the first step


def test_a_hundred_virtual_clients_learn(minilm_head_bundle, tmp_path):
    from fwdllm.coordinator.evaluation import BackendEvaluator

    cfg = SimConfig(
        bundle=str(minilm_head_bundle),
        data="bbc",
        clients=100,
        per_step=10,
        steps=5,
        perturbations=20,
        lr=0.5,
        alpha=None,
        eval_every=5,
        eval_limit=80,
        engine="flower",
    )
    summary = simulate(cfg, tmp_path / "run", progress=False)
    assert summary["steps"] == 5 and summary["perturbations"] == 5 * 10 * 20
    rows = _rows(tmp_path / "run")
    assert all(r["clients_answered"] == 10 for r in rows)
    with sqlite3.connect(tmp_path / "run" / "state" / "coordinator.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM clients").fetchone()[0] == 100  # every virtual node joined
        answered = db.execute("SELECT COUNT(DISTINCT client_id) FROM tasks WHERE status = 'accepted'").fetchone()[0]
    assert answered > 10  # selection spread the steps over the nodes
    # the final θ, evaluated apart from the run, is better than the bundle's
    evaluate = BackendEvaluator(minilm_head_bundle, tmp_path / "run" / "data" / "heldout.jsonl", limit=80)
    before = evaluate(load_theta(minilm_head_bundle, load_manifest(minilm_head_bundle)))
    after = evaluate(_theta(tmp_path / "run", minilm_head_bundle))
    assert after["accuracy"] == pytest.approx(summary["after"]["accuracy"])
    assert after["accuracy"] > before["accuracy"] + 0.1 and after["eval_loss"] < before["eval_loss"] - 0.1


def _certificates(out: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def certificate(subject: str, issuer: x509.Name, public, signer, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fwdllm test CA")])
    ca = certificate("fwdllm test CA", ca_name, ca_key.public_key(), ca_key, True)
    server = certificate("localhost", ca_name, key.public_key(), ca_key, False)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (out / "server.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    pkcs8 = serialization.PrivateFormat.PKCS8
    (out / "server.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption()))
    return out / "ca.pem", out / "server.pem", out / "server.key"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(condition, what: str, procs, limit_s: float = 600.0):
    """Poll ``condition`` until it returns something true; fail early when a process died."""
    import time

    give_up = time.monotonic() + limit_s
    while not (value := condition()):
        dead = [p.args[0] for p in procs if p.poll() is not None]
        assert not dead, f"{dead} exited while waiting for {what}"
        assert time.monotonic() < give_up, f"gave up waiting for {what}"
        time.sleep(0.5)
    return value


@pytest.mark.slow  # 1-2 minutes: every Flower message starts a ClientApp process on its SuperNode
def test_superlink_and_supernodes_over_tls_survive_a_killed_node(tiny_head, tmp_path):
    """A SuperLink and three SuperNodes as real processes on loopback, TLS throughout (the nodes and `flwr run`
    trust only a throwaway CA). Two of the three nodes get step 0's tasks; one of them is killed (SIGKILL,
    its whole process group) while it holds its task. The core's deadline expires that task and hands the
    slot to the third node, so both steps complete."""
    import os
    import signal
    import subprocess
    import sys

    from fwdllm.data.partition import client_file, open_federated, write_partition

    ca, cert, key = _certificates(tmp_path / "certs")
    write_partition(open_federated("bbc", 3, alpha=None, seed=0), tmp_path / "data")
    bin_dir = Path(sys.executable).parent
    home = tmp_path / "flwr-home"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FLWR_HOME": str(home)}
    env |= {"FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    port = _free_port()
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(name: str, *args: str) -> subprocess.Popen:
        with open(logs / f"{name}.log", "w") as log:
            return subprocess.Popen(
                [str(bin_dir / args[0]), *args[1:]],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    tls = ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
    procs = [
        start("superlink", "flower-superlink", *tls, "--port", str(port), "--disable-runtime-dependency-installation")
    ]
    try:
        for i in range(3):
            node_config = f"bundle='{tiny_head}' data='{tmp_path / 'data' / client_file(i)}'"
            procs.append(
                start(
                    f"node{i}",
                    "flower-supernode",
                    *("--superlink", f"127.0.0.1:{port}", "--root-certificates", str(ca)),
                    *("--port", str(_free_port()), "--node-config", node_config),
                )
            )
        node_ids = [
            _wait(lambda i=i: _logged_node_id(logs / f"node{i}.log"), f"node {i} to connect", procs) for i in range(3)
        ]
        home.mkdir(exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "tls"\n\n[superlink.tls]\naddress = "127.0.0.1:{port}"\n'
            f'root-certificates = "{ca}"\n'
        )
        config = tmp_path / "coordinator.json"
        run_section = {"steps": 2, "clients_per_step": 2, "perturbations_per_client": 3, "over_select": 0.0}
        run_section |= {"min_clients": 2, "min_results": 2, "deadline_s": 30.0}
        config.write_text(json.dumps({"run": run_section, "optimizer": {"lr": 0.05}}))
        state = tmp_path / "state"
        run_config = f"bundle='{tiny_head}' state='{state}' config='{config}' nodes=3"
        app = Path(__file__).resolve().parents[1] / "flower" / "app"
        submitted = subprocess.run(
            [str(bin_dir / "flwr"), "run", str(app), "tls", "--run-config", run_config],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr

        def step0_holders():
            if not (state / "coordinator.sqlite").exists():
                return None
            with sqlite3.connect(f"file:{state / 'coordinator.sqlite'}?mode=ro", uri=True) as db:
                rows = db.execute(
                    "SELECT c.name FROM tasks t JOIN clients c ON c.client_id = t.client_id "
                    "WHERE t.step = 0 AND t.status = 'open'"
                ).fetchall()
            return [name for (name,) in rows] or None

        holders = _wait(step0_holders, "step 0's tasks", procs)
        victim = next(i for i, n in enumerate(node_ids) if f"flower-node-{n}" in holders)
        os.killpg(procs[1 + victim].pid, signal.SIGKILL)
        procs[1 + victim].wait()
        alive = [p for k, p in enumerate(procs) if k != 1 + victim]
        _wait(lambda: (state / "theta.safetensors").exists(), "the run to finish", alive)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)

    assert "https://127.0.0.1" in (logs / "superlink.log").read_text()  # the SuperLink served TLS only
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [0, 1] and all(r["clients_answered"] == 2 for r in rows)
    with sqlite3.connect(state / "coordinator.sqlite") as db:
        step0 = db.execute(
            "SELECT c.name, t.status FROM tasks t JOIN clients c ON c.client_id = t.client_id WHERE t.step = 0"
        ).fetchall()
    victim_name = f"flower-node-{node_ids[victim]}"
    assert (victim_name, "expired") in step0  # its task expired ...
    assert (victim_name, "accepted") not in step0
    assert [status for _, status in step0].count("accepted") == 2  # ... and other nodes filled both slots
    assert not np.array_equal(_theta(tmp_path / "state", tiny_head), load_theta(tiny_head, load_manifest(tiny_head)))


def _logged_node_id(log: Path) -> int | None:
    import re

    found = re.search(r"SuperNode ID: (\d+)", log.read_text()) if log.exists() else None
    return int(found.group(1)) if found else None


def test_bad_settings_name_the_fix(tiny_head):
    from fwdllm.errors import UserError
    from fwdllm.flower.server_app import Job

    with pytest.raises(UserError, match="--engine 'spark' is not one of"):
        SimConfig(bundle=str(tiny_head), data="bbc", engine="spark").check()
    with pytest.raises(UserError, match="--client-cpus must be positive"):
        SimConfig(bundle=str(tiny_head), data="bbc", engine="flower", client_cpus=0).check()
    with pytest.raises(UserError, match=r"needs state"):
        Job.from_run_config({"bundle": str(tiny_head)})
    with pytest.raises(UserError, match=r"unknown run config keys \['bundel'\]"):
        Job.from_run_config({"bundel": "b", "state": "s"})
    assert Job.from_run_config({"bundle": "b", "state": "s", "wait-s": 5.0, "nodes": 3}).wait_s == 5.0
