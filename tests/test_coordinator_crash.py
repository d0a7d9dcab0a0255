"""SIGKILL the coordinator process mid-step, several times; restarts lose no accepted result and reuse no seed,
and a result whose reply a kill swallowed is a duplicate when the device resubmits it."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from test_coordinator_fixtures import (
    LAYOUT,
    QuadraticDevice,
    dense_v,
    make_bundle,
    peer_bounded,
    task_seeds,
    write_config,
)

from fwdllm.coordinator.server import KILL_AFTER_COMMIT_ENV
from fwdllm.proto.manifest import load_manifest
from fwdllm.proto.v1.fwdllm_pb2_grpc import FwdLLMStub

STEPS = 5


class Server:
    """`fwdllm coordinator serve` as a real process that the test can kill -9 and restart."""

    def __init__(self, tmp_path):
        self.bundle = make_bundle(tmp_path / "bundle")
        self.state = tmp_path / "state"
        self.config = write_config(
            tmp_path / "config.json",
            {
                "run": {
                    "steps": STEPS,
                    "clients_per_step": 3,
                    "perturbations_per_client": 2,
                    "min_clients": 3,
                    "over_select": 0.0,
                    "deadline_s": 60,
                },
                "optimizer": {"name": "momentum", "lr": 0.05, "momentum": 0.5, "schedule": "constant"},
                "aggregation": {"threads": 1},
                "server": {"rate_per_s": 1000, "rate_burst": 2000},
            },
        )
        self.log = open(tmp_path / "server.log", "ab")
        self.proc, self.port, self.starts = None, None, 0

    def start(self) -> int:
        """Launch and wait until it listens; a launch the test's own SIGKILL hit during start-up is retried."""
        endpoint = self.state / "endpoint"
        while True:
            endpoint.unlink(missing_ok=True)
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "fwdllm.cli",
                    "coordinator",
                    "serve",
                    "--bundle",
                    str(self.bundle),
                    "--state",
                    str(self.state),
                    "--port",
                    "0",
                    "--config",
                    str(self.config),
                    "--token",
                    "tok",
                ],
                stdout=self.log,
                stderr=self.log,
            )
            self.starts += 1
            deadline = time.monotonic() + 60
            while not endpoint.exists() and self.proc.poll() is None:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.05)
            if self.proc.poll() != -signal.SIGKILL:
                break
        assert self.proc.poll() in (None, -signal.SIGKILL), "the server exited at start-up; see server.log"
        self.port = int(endpoint.read_text())
        return self.port

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        self.log.close()


def momentum_replay(theta, ledger, lr=0.05, mu=0.5):
    buf = np.zeros_like(theta)
    for step in range(STEPS):
        seeds, jvp = zip(*peer_bounded(list(ledger[step].values())))
        g = np.array(jvp) @ dense_v(seeds) / len(seeds)
        buf = mu * buf + g
        theta = theta - lr * buf
    return theta


@pytest.mark.timeout(300)
def test_sigkill_mid_step_repeatedly_loses_nothing_and_reuses_no_seed(tmp_path):
    server = Server(tmp_path)
    fingerprint = load_manifest(server.bundle).fingerprint()
    channel = None
    ledger: dict[int, dict[str, list]] = {}  # step -> task_id -> [(seed, jvp)]
    seeds_by_task: dict[str, tuple] = {}
    kills = {"after_accept_step1": False, "after_pull_step2": False}
    random_kills = []
    rng = np.random.default_rng(7)

    def connect():
        """Restart the killed server (the operator's job) and point the devices at it."""
        nonlocal channel
        if channel is not None:
            channel.close()
        channel = grpc.insecure_channel(f"127.0.0.1:{server.start()}")
        for d in devices:
            d.stub = FwdLLMStub(channel)

    def with_retry(call):
        """A device's view: UNAVAILABLE means the server is down; wait for it and try again."""
        for _ in range(100):
            try:
                return call()
            except grpc.RpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    raise
                if server.proc.poll() is not None:
                    connect()
                else:
                    time.sleep(0.05)
        raise AssertionError("the server did not come back")

    devices = []
    try:
        server.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        devices = [QuadraticDevice(channel, i) for i in range(3)]
        for d in devices:
            d.join("tok", fingerprint)
        finished = False
        while not finished:
            for d in devices:
                reply = with_retry(d.pull)
                if reply.run_finished:
                    finished = True
                    break
                if reply.WhichOneof("outcome") != "task":
                    continue
                task = reply.task
                seeds = tuple(task_seeds(task))
                assert seeds_by_task.setdefault(task.task_id, seeds) == seeds
                if task.step == 2 and not kills["after_pull_step2"]:
                    kills["after_pull_step2"] = True
                    server.kill()  # the task was handed out and committed; the device still holds it
                if (
                    task.step >= 3 and len(random_kills) < task.step - 2
                ):  # once in step 3, once in step 4, at a random instant
                    timer = threading.Timer(rng.uniform(0.0, 0.03), server.kill)
                    timer.start()
                    random_kills.append(timer)
                jvp = with_retry(lambda d=d, task=task: d.compute(task))
                answer = with_retry(lambda d=d, task=task, jvp=jvp: d.submit(task, jvp))
                assert answer.accepted
                ledger.setdefault(task.step, {})[task.task_id] = list(zip(seeds, jvp.tolist()))
                if task.step == 1 and not kills["after_accept_step1"]:
                    kills["after_accept_step1"] = True
                    server.kill()
                    connect()
                    # The accepted result survived: the same submit is now a duplicate.
                    assert d.submit(task, jvp).duplicate
            if server.proc.poll() is not None:
                connect()
        for t in random_kills:
            t.join()
        if server.proc.poll() is not None:
            connect()
        assert all(kills.values()) and server.starts >= 4  # two random kills may hit the same process
        # No seed was ever handed out twice, across all restarts.
        all_seeds = [s for seeds in seeds_by_task.values() for s in seeds]
        assert len(all_seeds) == len(set(all_seeds))
        # Every accepted result is in its step's update: theta equals the dense replay of the ledger.
        assert sorted(ledger) == list(range(STEPS)) and all(len(v) == 3 for v in ledger.values())
        final = with_retry(lambda: devices[0].fetch(0))
        theta0 = np.linspace(-1, 1, LAYOUT.dim, dtype=np.float32).astype(np.float64)
        np.testing.assert_allclose(final, momentum_replay(theta0, ledger), atol=5e-5)
    finally:
        if channel is not None:
            channel.close()
        server.stop()


KILLS = 5


@pytest.mark.timeout(300)
def test_sigkill_between_a_results_commit_and_its_reply_makes_the_resubmission_a_duplicate(tmp_path, monkeypatch):
    """The server commits a result and dies before replying (the fault hook of server.py); the device, having
    heard nothing, resubmits to the restarted server and is told "duplicate": counted once, no error. Five
    times, on the first results of steps 0 and 1, the last of which also closes step 0."""
    server = Server(tmp_path)
    fingerprint = load_manifest(server.bundle).fingerprint()
    kills = 0
    ledger: dict[int, dict[str, list]] = {}

    def restart() -> grpc.Channel:
        """The operator restarts the killed server; the fault hook stays armed for the next kill, if any."""
        if kills < KILLS:
            monkeypatch.setenv(KILL_AFTER_COMMIT_ENV, "1")
        else:
            monkeypatch.delenv(KILL_AFTER_COMMIT_ENV, raising=False)
        channel = grpc.insecure_channel(f"127.0.0.1:{server.start()}")
        for d in devices:
            d.stub = FwdLLMStub(channel)
        return channel

    devices: list[QuadraticDevice] = []
    channel = restart()
    try:
        devices.extend(QuadraticDevice(channel, i) for i in range(3))
        for d in devices:
            d.join("tok", fingerprint)
        finished = False
        while not finished:
            for d in devices:
                reply = d.pull()
                if reply.run_finished:
                    finished = True
                    break
                if reply.WhichOneof("outcome") != "task":
                    continue
                task, jvp = reply.task, d.compute(reply.task)
                try:
                    answer = d.submit(task, jvp)
                except grpc.RpcError as exc:  # no reply: the server died after committing
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE and server.proc.wait(timeout=30) == -signal.SIGKILL
                    kills += 1
                    channel.close()
                    channel = restart()
                    answer = d.submit(task, jvp)  # the device's resubmission of the same result
                    assert answer.accepted and answer.duplicate, answer
                else:
                    assert answer.accepted and not answer.duplicate
                ledger.setdefault(task.step, {})[task.task_id] = list(zip(task_seeds(task), jvp.tolist()))
        assert kills == KILLS and server.starts == KILLS + 1
        counters = dict(
            sqlite3.connect(server.state / "coordinator.sqlite").execute("SELECT name, value FROM counters")
        )
        assert counters["accepted"] == 3 * STEPS and counters["duplicate"] == KILLS
        assert not any(name.startswith("rejected_") for name in counters), counters
        # Each result counted once: θ is the dense replay of the ledger.
        final = devices[0].fetch(0)
        theta0 = np.linspace(-1, 1, LAYOUT.dim, dtype=np.float32).astype(np.float64)
        np.testing.assert_allclose(final, momentum_replay(theta0, ledger), atol=5e-5)
    finally:
        channel.close()
        server.stop()
