"""What devices download to keep θ current: never more per task than θ itself plus message overhead.

Short real runs: the coordinator (in-process gRPC server) and real ``DeviceClient`` s on the tiny
test bundle (d = 387, θ = 1,548 bytes). The coordinator's own ``bytes_down`` per metrics row is
checked against a bound built from independent counts: the tasks of the step (tasks table) times
the size of θ's download message, plus an allowance for the task message and a history refusal.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

from device_standin import TEXTS, shared_backend, shared_bundle, theta_dim, write_jsonl
from test_coordinator_server import (
    BASE,
    drive,
    run,  # noqa: F401 (the fixture that starts a coordinator for numpy devices)
)

from fwdllm.coordinator.config import from_dict
from fwdllm.coordinator.rounds import Coordinator
from fwdllm.coordinator.server import start
from fwdllm.device_runtime.client import ClientConfig, DeviceClient
from fwdllm.proto.v1 import fwdllm_pb2 as pb
from fwdllm.simulate_worker import SerializedBackend

TOKEN = "tok"
#: A PullTaskResponse with a seed-range task is ~70 bytes and a history refusal ~6: 128 covers both.
TASK_AND_REFUSAL = 128


def config(devices: int, per_step: int, seeds: int, steps: int, optimizer: str = "sgd") -> dict:
    return {
        "run": {
            "steps": steps,
            "clients_per_step": per_step,
            "perturbations_per_client": seeds,
            "min_clients": devices,
            "min_results": per_step,
            "over_select": 0.0,
            "batch_size": 4,
            "deadline_s": 120,
        },
        "optimizer": {"name": optimizer, "lr": 0.01},
        "aggregation": {"threads": 1},
        "server": {"heartbeat_ms": 200, "retry_ms": 50, "rate_per_s": 1000, "rate_burst": 2000},
    }


def theta_message_bytes(dim: int) -> int:
    """θ's download: one ParameterChunk with every value and the sha256 (the server's default chunking)."""
    return pb.ParameterChunk(version=99, offset=0, total=dim, values=bytes(4 * dim), sha256="0" * 64).ByteSize()


@dataclass
class Outcome:
    rows: list[dict]  # the coordinator's metrics rows
    tasks: dict[int, int]  # step -> tasks created (the tasks table)
    clients: list[DeviceClient]


def run_federation(tmp_path, cfg: dict, devices: int, history_calls: list | None = None) -> Outcome:
    """Serve ``cfg`` to ``devices`` real clients until the run finishes."""
    bundle = shared_bundle()[0]
    coordinator = Coordinator(bundle, tmp_path / "state", from_dict(cfg))
    coordinator.store.add_token(TOKEN)
    if history_calls is not None:  # count FetchHistory calls on the server side, independently of the clients
        answer = coordinator.fetch_history
        coordinator.fetch_history = lambda req: history_calls.append(req) or answer(req)
    server = start(coordinator, "127.0.0.1", 0)
    backend = SerializedBackend(shared_backend("onnxruntime", True))
    data = write_jsonl(tmp_path / "client.jsonl", [{"text": t, "label": lab} for t, lab in TEXTS])
    clients = [
        DeviceClient(
            ClientConfig(
                coordinator=f"127.0.0.1:{server.port}",
                bundle=bundle,
                data=data,
                token=TOKEN,
                name=f"d{i}",
                backoff_s=(0.05, 0.4),
                rpc_timeout_s=30,
            ),
            backend=backend,
        )
        for i in range(devices)
    ]
    codes: list[int] = []
    threads = [threading.Thread(target=lambda c=c: codes.append(c.run()), daemon=True) for c in clients]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert codes == [0] * devices, codes
        return Outcome(
            rows=[json.loads(r[0]) for r in coordinator.store.query("SELECT row FROM metrics ORDER BY step")],
            tasks=dict(coordinator.store.query("SELECT step, COUNT(*) FROM tasks GROUP BY step")),
            clients=clients,
        )
    finally:
        for c in clients:
            c.stop()
        server.stop(0)


def assert_downloads_within_theta_per_task(result: Outcome) -> None:
    dim = theta_dim()
    assert [r["step"] for r in result.rows] == sorted(result.tasks)
    for row in result.rows:
        bound = result.tasks[row["step"]] * (theta_message_bytes(dim) + TASK_AND_REFUSAL)
        assert 0 < row["bytes_down"] <= bound, (row["step"], row["bytes_down"], bound)


def test_history_larger_than_theta_is_never_sent(tmp_path):
    """300 seeds per task: one update's history (~7 KB) outweighs θ (1.5 KB), so every new version is a download."""
    steps, calls = 4, []
    result = run_federation(tmp_path, config(2, 2, 300, steps), 2, calls)
    assert_downloads_within_theta_per_task(result)
    for c in result.clients:
        assert c.stats["tasks"] == steps and c.stats["theta_replays"] == 0 and c.stats["theta_fetches"] == steps
    assert len(calls) == 2 * (steps - 1) and all(r.max_bytes == 4 * theta_dim() for r in calls)


def test_short_history_is_replayed_below_theta_size(tmp_path):
    """10 seeds per task and both devices in every step: each catch-up is one small update, replayed."""
    steps = 5
    result = run_federation(tmp_path, config(2, 2, 10, steps), 2)
    assert_downloads_within_theta_per_task(result)
    for c in result.clients:  # the last task was at version `steps`; the run then applied one more update
        assert c.stats["theta_fetches"] == 1 and c.stats["theta_replays"] == steps - 1 and c.theta_version == steps
    # After the first step both tasks together (task messages and one update each) cost less than one θ.
    assert all(r["bytes_down"] < 4 * theta_dim() for r in result.rows[1:])


def test_mixed_gaps_replay_the_short_ones_and_download_the_long_ones(tmp_path):
    """4 devices, 2 per step: a device comes back after 1..n versions; 60 seeds per update (~0.8 KB)."""
    steps = 8
    result = run_federation(tmp_path, config(4, 2, 30, steps), 4)
    assert_downloads_within_theta_per_task(result)
    for c in result.clients:  # every task names a version the device does not hold yet
        assert c.stats["theta_fetches"] + c.stats["theta_replays"] == c.stats["tasks"]
    assert sum(c.stats["tasks"] for c in result.clients) == 2 * steps
    # Both ways were taken: replays (one-version gaps), and downloads beyond each device's first (longer gaps).
    assert sum(c.stats["theta_replays"] for c in result.clients) > 0
    assert sum(c.stats["theta_fetches"] for c in result.clients) > len(result.clients)


def test_adam_downloads_theta_once_per_version_and_stops_asking_for_history(tmp_path):
    steps, calls = 4, []
    result = run_federation(tmp_path, config(2, 2, 10, steps, optimizer="adam"), 2, calls)
    assert_downloads_within_theta_per_task(result)
    for c in result.clients:
        assert c.stats["theta_fetches"] == steps and c.stats["theta_replays"] == 0 and not c.history_replayable
    assert len(calls) == 2  # one refusal (HISTORY_NOT_REPLAYABLE) per device, then no more questions


def test_history_caps_are_applied_before_sending(run):
    """The server answers within max_bytes / max_seeds or refuses with a few bytes; 0 means no cap."""
    coordinator, _, devices = run(BASE)
    drive(coordinator, devices)  # 3 steps of 12 seeds: versions 2..4 in history
    d = devices[0]

    def ask(**caps):
        before = coordinator.bytes_down
        reply = d.stub.FetchHistory(
            pb.FetchHistoryRequest(client_id=d.client_id, session_token=d.session, from_version=1, **caps)
        )
        assert coordinator.bytes_down - before == reply.ByteSize()  # what the device received, counted
        return reply

    whole = ask()
    assert whole.available and [len(u.seeds) for u in whole.updates] == [12, 12, 12]
    size = whole.ByteSize()
    assert ask(max_bytes=size, max_seeds=36) == whole
    for caps in ({"max_bytes": size - 1}, {"max_seeds": 35}, {"max_bytes": 4 * 35}):
        refused = ask(**caps)
        assert not refused.available and refused.refusal == pb.HISTORY_OVER_CAP and not refused.updates
        assert refused.ByteSize() < 16
    late = d.stub.FetchHistory(pb.FetchHistoryRequest(client_id=d.client_id, session_token=d.session, from_version=9))
    assert not late.available and late.refusal == pb.HISTORY_NOT_KEPT
