"""A real coordinator on loopback driven by devices speaking the real protocol (numpy quadratic loss)."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_coordinator_fixtures import LAYOUT, QuadraticDevice, dense_v, make_bundle, peer_bounded, task_seeds

from fwdllm.coordinator.config import from_dict
from fwdllm.coordinator.rounds import Coordinator
from fwdllm.coordinator.sampler import cosines
from fwdllm.coordinator.server import start
from fwdllm.proto.perturbation import generate
from fwdllm.proto.v1 import fwdllm_pb2 as pb
from fwdllm.proto.v1 import fwdllm_pb2_grpc as pb_grpc

BASE = {
    "run": {
        "steps": 3,
        "clients_per_step": 3,
        "perturbations_per_client": 4,
        "min_clients": 3,
        "over_select": 0.0,
        "deadline_s": 30,
    },
    "optimizer": {"name": "sgd", "lr": 0.05, "schedule": "linear"},
    "aggregation": {"threads": 1},
    "server": {"rate_per_s": 1000, "rate_burst": 2000},
}  # devices poll fast here


def merged(**sections):
    cfg = json.loads(json.dumps(BASE))
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


@pytest.fixture()
def run(tmp_path):
    """Start a coordinator with a config; yields (coordinator, channel, devices, token)."""
    servers, channels = [], []

    def _start(config: dict, devices: int = 3):
        bundle = make_bundle(tmp_path / "bundle")
        coordinator = Coordinator(bundle, tmp_path / f"state{len(servers)}", from_dict(config))
        coordinator.store.add_token("tok")
        server = start(coordinator, "127.0.0.1", 0)
        servers.append(server)
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        channels.append(channel)
        devs = [QuadraticDevice(channel, i) for i in range(devices)]
        for d in devs:
            d.join("tok", coordinator.fingerprint)
        return coordinator, channel, devs

    yield _start
    for c in channels:
        c.close()
    for s in servers:
        s.stop(0)


def drive(coordinator, devices, max_rounds=200, on_task=None):
    """Round-robin the devices until the run finishes; returns the ledger {step: [[(seed, jvp)] per result]}."""
    ledger: dict[int, list] = {}
    for _ in range(max_rounds):
        if coordinator.meta("finished"):
            return ledger
        for d in devices:
            reply = d.pull()
            if reply.WhichOneof("outcome") != "task":
                continue
            task = reply.task
            if on_task:
                on_task(d, task)
            jvp = d.compute(task)
            if d.submit(task, jvp).accepted:
                ledger.setdefault(task.step, []).append(list(zip(task_seeds(task), jvp.tolist())))
    raise AssertionError("the run did not finish")


def replay_dense(theta, ledger, lrs):
    for step in sorted(ledger):
        seeds, jvp = zip(*peer_bounded(ledger[step]))
        theta = theta - lrs[step] * (np.array(jvp) @ dense_v(seeds)) / len(seeds)
    return theta


def test_steps_complete_and_equal_the_dense_update(run):
    coordinator, channel, devices = run(BASE)
    theta0 = np.linspace(-1, 1, LAYOUT.dim, dtype=np.float32).astype(np.float64)
    ledger = drive(coordinator, devices)
    assert sorted(ledger) == [0, 1, 2] and all(sum(map(len, v)) == 12 for v in ledger.values())
    want = replay_dense(theta0, ledger, [0.05 * (3 - t) / 3 for t in range(3)])
    np.testing.assert_allclose(coordinator.theta, want, atol=2e-5)
    # The estimate points along the true mean gradient (it is unbiased; 12 perturbations of d=79).
    seeds, jvp = zip(*peer_bounded(ledger[0]))
    estimate = np.array(jvp) @ dense_v(seeds) / len(seeds)
    true = np.mean([d.gradient(theta0) for d in devices], axis=0)
    assert estimate @ true > 0
    rows = [json.loads(line) for line in (coordinator.store.dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and all(r["perturbations"] == 12 for r in rows)
    assert all(r["clients_answered"] == 3 and r["bytes_up"] > 0 for r in rows)
    csv_lines = (coordinator.store.dir / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == 4 and csv_lines[0].startswith("step,")
    assert devices[0].pull().run_finished
    status = pb_grpc.FwdLLMStub(channel).GetStatus(pb.GetStatusRequest(), metadata=[("authorization", "Bearer tok")])
    assert status.finished and status.step == 3 and status.counters["accepted"] == 9


def test_history_replay_reproduces_theta(run):
    coordinator, channel, devices = run(BASE)
    drive(coordinator, devices)
    d = devices[0]
    history = d.stub.FetchHistory(
        pb.FetchHistoryRequest(client_id=d.client_id, session_token=d.session, from_version=1)
    )
    assert history.available and [u.version for u in history.updates] == [2, 3, 4]
    theta = np.linspace(-1, 1, LAYOUT.dim, dtype=np.float32)
    for u in history.updates:
        for seed, c in zip(u.seeds, u.coefficients):
            theta = theta - np.float32(u.lr) * np.float32(c) * generate(seed, 0, LAYOUT.dim)
    np.testing.assert_allclose(theta, coordinator.theta, atol=1e-5)


def test_history_unavailable_with_adam(run):
    coordinator, channel, devices = run(merged(optimizer={"name": "adam", "lr": 0.01}, run={"steps": 1}))
    drive(coordinator, devices)
    d = devices[0]
    reply = d.stub.FetchHistory(pb.FetchHistoryRequest(client_id=d.client_id, session_token=d.session, from_version=1))
    assert not reply.available


@pytest.mark.parametrize("threshold,waves", [(1e9, 1), (1e-12, 3)])
def test_variance_control_raises_the_count_when_the_threshold_is_lowered(run, threshold, waves):
    config = merged(
        run={"steps": 2},
        variance={"mode": "threshold", "threshold": threshold, "max_waves": 3, "probe": "classifier.weight"},
    )
    coordinator, channel, devices = run(config)
    ledger = drive(coordinator, devices)
    rows = [json.loads(line) for line in (coordinator.store.dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["waves"] for r in rows] == [waves, waves]
    assert [r["perturbations"] for r in rows] == [12 * waves] * 2
    assert all(sum(map(len, v)) == 12 * waves for v in ledger.values())
    # The update is the mean over all waves.
    theta0 = np.linspace(-1, 1, LAYOUT.dim, dtype=np.float32).astype(np.float64)
    np.testing.assert_allclose(coordinator.theta, replay_dense(theta0, ledger, [0.05, 0.025]), atol=2e-5)


def test_relative_variance_mode_adds_waves_until_a_quarter_of_step_0(run):
    config = merged(run={"steps": 1}, variance={"mode": "relative", "relative": 0.25, "max_waves": 6})
    coordinator, _, devices = run(config)
    drive(coordinator, devices)
    row = json.loads((coordinator.store.dir / "metrics.jsonl").read_text().splitlines()[0])
    assert row["waves"] > 1
    assert row["waves"] == 6 or row["variance"] <= 0.25 * coordinator.meta("var0")


def test_sampler_hands_out_perturbations_aligned_with_the_previous_gradient(run):
    config = merged(run={"steps": 2, "perturbations_per_client": 5}, sampler={"enabled": True, "pool_factor": 10})
    coordinator, _, devices = run(config)
    seen: dict[int, list] = {}
    explicit: dict[int, set] = {}

    def record(device, task):
        seen.setdefault(task.step, []).extend(task_seeds(task))
        explicit.setdefault(task.step, set()).add(len(task.seeds) > 0)

    ledger = drive(coordinator, devices, on_task=record)
    assert explicit == {0: {False}, 1: {True}}  # step 0 draws plainly (seed ranges), odd step 1 samples
    seeds0, jvp0 = zip(*peer_bounded(ledger[0]))
    previous = np.array(jvp0) @ dense_v(seeds0) / len(seeds0)
    chosen = cosines(seen[1], previous.astype(np.float32), "gaussian")
    plain = cosines(seen[0], previous.astype(np.float32), "gaussian")
    assert chosen.mean() > plain.mean() + 0.1
    assert coordinator.meta("finished")


def test_health_and_reflection_answer(run):
    coordinator, channel, _ = run(BASE, devices=0)
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="fwdllm.v1.FwdLLM"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in answers[0].list_services_response.service}
    assert "fwdllm.v1.FwdLLM" in names and "grpc.health.v1.Health" in names


def test_a_held_pull_is_answered_with_its_task_when_the_wave_opens(run):
    """A device asking to be held gets its task in the same call once a third device's Join lets the wave
    open, where an unheld pull is told to come back later."""
    config = merged(server={"pull_wait_ms": 20_000, "heartbeat_ms": 30_000})
    coordinator, channel, (held, polling) = run(config, devices=2)
    request = pb.PullTaskRequest(client_id=held.client_id, session_token=held.session, wait_ms=20_000)
    pending = held.stub.PullTask.future(request, timeout=60)
    assert polling.pull().retry_after_ms == 500  # two of the three devices the wave needs
    third = QuadraticDevice(channel, 2)
    assert third.join("tok", coordinator.fingerprint).pull_wait_ms == 20_000
    reply = pending.result(timeout=60)
    assert reply.WhichOneof("outcome") == "task" and reply.task.step == 0


def test_a_held_pull_without_work_ends_after_its_hold_and_asks_for_a_pull_at_once(run):
    coordinator, _, (held, _) = run(merged(server={"pull_wait_ms": 300}), devices=2)
    request = pb.PullTaskRequest(client_id=held.client_id, session_token=held.session, wait_ms=300)
    reply = held.stub.PullTask(request, timeout=60)
    assert reply.WhichOneof("outcome") == "retry_after_ms" and reply.retry_after_ms == 0
    assert coordinator.meta("wave_open") is False
