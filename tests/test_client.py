"""The device client against a small real gRPC coordinator on loopback.

The servicer here implements just enough of the v1 contract to drive the client through
joins, θ downloads and history replay, lost acknowledgements, a coordinator restart,
cancellation, deadlines and bad tasks. Submitted jvps are checked against autograd.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from collections import Counter
from concurrent import futures

import grpc
import numpy as np
import pytest
import torch
from device_standin import TEXTS, initial_theta, shared_backend, shared_bundle, write_jsonl

from fwdllm.device_runtime.backend import select
from fwdllm.device_runtime.client import ClientConfig, ClientError, DeviceClient
from fwdllm.proto.manifest import load_manifest
from fwdllm.proto.perturbation import generate
from fwdllm.proto.v1 import fwdllm_pb2 as pb
from fwdllm.proto.v1 import fwdllm_pb2_grpc as pb_grpc

TOKEN = "enrol-me"


class MiniCoordinator(pb_grpc.FwdLLMServicer):
    """In-memory coordinator: a fixed task list, θ versions, sessions that a restart forgets."""

    def __init__(self, fingerprint, versions, tasks, history=(), checks_fingerprint=True):
        self.fingerprint, self.versions, self.history = fingerprint, versions, list(history)
        self.tasks = list(tasks)
        self.sessions: dict[str, str] = {}
        self.joins: list[pb.JoinRequest] = []
        self.results: dict[str, pb.SubmitRequest] = {}
        self.submits = Counter()
        self.lose_ack: set[str] = set()  # record the result, then fail the call as if the answer was lost
        self.cancel: set[str] = set()
        self.pull_delay_s = 0.0
        self.checks_fingerprint = checks_fingerprint
        self.left = False
        self.skipped: set[str] = set()  # handed out once; a device that drops a task does not get it again

    def _auth(self, request, context):
        if self.sessions.get(request.session_token) != request.client_id:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown session: Join first")

    def Join(self, request, context):
        if request.enrolment_token != TOKEN:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "enrolment token is unknown")
        if self.checks_fingerprint and request.model_fingerprint != self.fingerprint:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "model fingerprint differs")
        self.joins.append(request)
        client_id = request.previous_client_id or uuid.uuid4().hex
        session = uuid.uuid4().hex
        self.sessions[session] = client_id
        return pb.JoinResponse(
            client_id=client_id,
            session_token=session,
            protocol_version=pb.PROTOCOL_VERSION_1,
            model_fingerprint=self.fingerprint,
            theta_dim=self.versions[1].size,
            theta_version=max(self.versions),
            heartbeat_interval_ms=50,
        )

    def PullTask(self, request, context):
        self._auth(request, context)
        time.sleep(self.pull_delay_s)
        open_tasks = [t for t in self.tasks if t.task_id not in self.results and t.task_id not in self.skipped]
        if not open_tasks:
            return pb.PullTaskResponse(run_finished=True)
        task = open_tasks[0]
        self.skipped.add(task.task_id)
        return pb.PullTaskResponse(task=task)

    def Submit(self, request, context):
        self._auth(request, context)
        self.submits[request.task_id] += 1
        if request.task_id in self.results:
            return pb.SubmitResponse(accepted=True, duplicate=True)
        task = next(t for t in self.tasks if t.task_id == request.task_id)
        if task.deadline_unix_ms and time.time() * 1000 > task.deadline_unix_ms:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the task's deadline passed")
        self.results[request.task_id] = request
        if request.task_id in self.lose_ack:
            self.lose_ack.discard(request.task_id)
            context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset before the answer")
        return pb.SubmitResponse(accepted=True, message="accepted")

    def Heartbeat(self, request, context):
        self._auth(request, context)
        return pb.HeartbeatResponse(cancel_task_ids=sorted(self.cancel), theta_version=max(self.versions))

    def Leave(self, request, context):
        self._auth(request, context)
        self.left = True
        return pb.LeaveResponse()

    def FetchParameters(self, request, context):
        self._auth(request, context)
        version = request.version or max(self.versions)
        data = self.versions[version].astype("<f4").tobytes()
        chunk = 40  # values per chunk, so θ takes several messages
        for offset in range(0, len(data) // 4, chunk):
            last = offset + chunk >= len(data) // 4
            yield pb.ParameterChunk(
                version=version,
                offset=offset,
                total=len(data) // 4,
                values=data[4 * offset : 4 * (offset + chunk)],
                sha256=hashlib.sha256(data).hexdigest() if last else "",
            )

    def FetchHistory(self, request, context):
        self._auth(request, context)
        updates = [u for u in self.history if request.from_version < u.version <= request.to_version]
        return pb.FetchHistoryResponse(available=bool(updates), updates=updates, theta_dim=self.versions[1].size)


def serve(servicer, port=0):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_FwdLLMServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, port


def make_task(tid, version, seeds=(), start=None, count=0, batch=(0, 4), deadline_ms=0, scheme=pb.CENTRAL):
    task = pb.Task(
        task_id=tid,
        step=version - 1,
        theta_version=version,
        seeds=list(seeds),
        distribution=pb.GAUSSIAN,
        epsilon=0.01,
        scheme=scheme,
        batch=pb.BatchRef(start=batch[0], size=batch[1]),
        deadline_unix_ms=deadline_ms,
    )
    if count:
        task.seed_ranges.append(pb.SeedRange(start=start, count=count))
    return task


@pytest.fixture
def bundle():
    return shared_bundle()


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "client-00000.jsonl", [{"text": t, "label": lab} for t, lab in TEXTS])


def client_for(bundle, data, port, **kw):
    cfg = ClientConfig(
        coordinator=f"127.0.0.1:{port}",
        bundle=bundle[0],
        data=data,
        token=TOKEN,
        backoff_s=(0.05, 0.4),
        rpc_timeout_s=5,
        **kw,
    )
    return DeviceClient(cfg, backend=shared_backend("onnxruntime", True))


def run_in_thread(client, **kw):
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("rc", client.run(**kw)), daemon=True)
    thread.start()
    return thread, box


def autograd_jvp(model, batch, theta, seeds):
    """∇f(θ)·v(seed) in float64: autograd's gradient (one backward pass) dotted with each perturbation."""
    ids, mask, labels = (torch.tensor(x) for x in (batch.input_ids, batch.attention_mask, batch.labels))
    model = model.double()  # a float64 copy
    grad = torch.func.grad(lambda x: model.loss(ids, mask, labels, x[None])[0][0])(
        torch.tensor(theta, dtype=torch.float64)
    ).numpy()
    return np.array([generate(s, 0, grad.size).astype(np.float64) @ grad for s in seeds])


def test_client_serves_tasks_replays_history_and_matches_autograd(bundle, data, caplog):
    fingerprint = load_manifest(bundle[0]).fingerprint()
    theta1 = initial_theta(5)
    update = pb.UpdateRecord(version=2, lr=0.1, seeds=[11, 12], coefficients=[0.5, -0.25], distribution=pb.GAUSSIAN)
    theta2 = (
        theta1.astype(np.float64)
        - 0.1 * (0.5 * generate(11, 0, theta1.size).astype(np.float64) - 0.25 * generate(12, 0, theta1.size))
    ).astype(np.float32)
    tasks = [
        make_task("t1", 1, seeds=[5, 9], start=100, count=3, batch=(5, 4)),
        make_task("t2", 2, start=1 << 32, count=4, batch=(0, 3)),
    ]
    coord = MiniCoordinator(fingerprint, {1: theta1, 2: theta2}, tasks, history=[update])
    server, port = serve(coord)
    try:
        client = client_for(bundle, data, port)
        with caplog.at_level(logging.INFO, logger="fwdllm.device"):
            assert client.run() == 0
    finally:
        server.stop(0)
    assert coord.left and len(coord.joins) == 1
    caps = coord.joins[0].capabilities
    assert caps.backend == "onnxruntime" and "CPUExecutionProvider" in caps.delegates and caps.cpu_count >= 1
    assert client.stats["theta_fetches"] == 1 and client.stats["theta_replays"] == 1
    assert sum(r.getMessage().startswith("task ") for r in caplog.records) == 2  # one line per task
    examples = client.data.examples
    for task, theta in ((tasks[0], theta1), (tasks[1], theta2)):
        got = coord.results[task.task_id]
        seeds = list(task.seeds) + [task.seed_ranges[0].start + i for i in range(task.seed_ranges[0].count)]
        assert list(got.seeds) == seeds and got.num_examples == task.batch.size and list(got.nonfinite) == []
        batch = client.data.tokenizer.batch(select(examples, task.batch.start, task.batch.size))
        np.testing.assert_allclose(got.jvp, autograd_jvp(bundle[1], batch, theta, seeds), rtol=0, atol=1.5e-2)
        assert np.isnan(got.loss.base) and got.loss.min <= got.loss.mean <= got.loss.max


def test_lost_acknowledgement_is_resubmitted_and_never_accepted_twice(bundle, data):
    fingerprint = load_manifest(bundle[0]).fingerprint()
    tasks = [make_task(f"t{i}", 1, seeds=[i, i + 10]) for i in range(3)]
    coord = MiniCoordinator(fingerprint, {1: initial_theta()}, tasks)
    coord.lose_ack = {"t1"}
    server, port = serve(coord)
    try:
        client = client_for(bundle, data, port)
        assert client.run() == 0
    finally:
        server.stop(0)
    assert coord.submits == Counter({"t0": 1, "t1": 2, "t2": 1})
    assert client.stats["duplicate"] == 1 and client.stats["accepted"] == 2 and not client.pending


def test_survives_a_coordinator_restart_and_keeps_its_identity(bundle, data, tmp_path):
    fingerprint = load_manifest(bundle[0]).fingerprint()
    tasks = [make_task(f"t{i}", 1, seeds=[i]) for i in range(4)]
    first = MiniCoordinator(fingerprint, {1: initial_theta()}, tasks)
    first.pull_delay_s = 0.2
    server, port = serve(first)
    client = client_for(bundle, data, port, state_file=tmp_path / "device.json")
    thread, box = run_in_thread(client)
    while len(first.results) < 1:
        time.sleep(0.02)
    server.stop(0)  # the coordinator goes away; the device retries with backoff
    time.sleep(0.5)
    second = MiniCoordinator(fingerprint, {1: initial_theta()}, tasks)  # restarted: results kept, sessions lost
    second.results, second.skipped, second.submits = first.results, set(first.results), first.submits
    server, _ = serve(second, port)
    try:
        thread.join(timeout=60)
    finally:
        server.stop(0)
    assert box.get("rc") == 0
    assert sorted(second.results) == ["t0", "t1", "t2", "t3"]
    assert second.joins[0].previous_client_id == client.client_id  # re-joined under its old identity
    assert client.stats["retries"] >= 1 and client.stats["rejoins"] >= 1
    assert (tmp_path / "device.json").is_file() and max(first.submits.values()) <= 2


def test_refuses_a_bundle_of_another_model(bundle, data):
    coord = MiniCoordinator("f" * 64, {1: initial_theta()}, [], checks_fingerprint=False)
    server, port = serve(coord)
    try:
        with pytest.raises(ClientError, match="not the model this coordinator trains"):
            client_for(bundle, data, port).run()
        strict = MiniCoordinator("f" * 64, {1: initial_theta()}, [])
        server2, port2 = serve(strict)
        try:
            with pytest.raises(ClientError, match="FAILED_PRECONDITION"):
                client_for(bundle, data, port2).run()
        finally:
            server2.stop(0)
    finally:
        server.stop(0)


def test_cancelled_late_and_bad_tasks_are_not_submitted_and_serving_continues(bundle, data, caplog):
    fingerprint = load_manifest(bundle[0]).fingerprint()
    huge = initial_theta()
    huge[:] = 3e38  # activations overflow: every loss is NaN
    tasks = [
        make_task("late", 1, seeds=[1], deadline_ms=int(time.time() * 1000) - 1000),
        make_task("cancelled", 1, seeds=[2]),
        make_task("too-many", 1, start=0, count=9),
        make_task("nan", 2, seeds=[3, 4]),
        make_task("fine", 1, seeds=[5]),
    ]
    coord = MiniCoordinator(fingerprint, {1: initial_theta(), 2: huge}, tasks)
    coord.cancel = {"cancelled"}
    coord.pull_delay_s = 0.15  # heartbeats (every 50 ms) deliver the cancellation before the task starts
    server, port = serve(coord)
    try:
        client = client_for(bundle, data, port, max_seeds=8)
        with caplog.at_level(logging.INFO, logger="fwdllm.device"):
            assert client.run() == 0
    finally:
        server.stop(0)
    assert sorted(coord.results) == ["fine", "nan"]
    nan = coord.results["nan"]
    assert list(nan.nonfinite) == [0, 1] and list(nan.jvp) == [0.0, 0.0]
    text = caplog.text
    assert "deadline passed" in text and "cancelled by the coordinator" in text and "at most 8" in text
    assert client.stats["failed"] == 1 and client.stats["cancelled"] == 2


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
