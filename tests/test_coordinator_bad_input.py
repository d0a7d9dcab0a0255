"""Bad input to a real coordinator: each is rejected with the right status, counted, and nothing accepted is lost."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
from test_coordinator_fixtures import QuadraticDevice, make_bundle, task_seeds

from fwdllm.coordinator.config import from_dict
from fwdllm.coordinator.rounds import Coordinator
from fwdllm.coordinator.server import SERVICE, start
from fwdllm.proto.v1 import fwdllm_pb2 as pb

CONFIG = {
    "run": {
        "steps": 5,
        "clients_per_step": 3,
        "perturbations_per_client": 3,
        "min_clients": 2,
        "over_select": 0.0,
        "deadline_s": 30,
    },
    "server": {"max_message_bytes": 64 * 1024, "rate_per_s": 1000, "rate_burst": 2000},
    "aggregation": {"threads": 1},
}


@pytest.fixture()
def env(tmp_path):
    coordinator = Coordinator(make_bundle(tmp_path / "b"), tmp_path / "s", from_dict(CONFIG))
    coordinator.store.add_token("tok")
    server = start(coordinator, "127.0.0.1", 0)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}", options=[("grpc.max_send_message_length", 8 << 20)])
    a, b = QuadraticDevice(channel, 0), QuadraticDevice(channel, 1)
    a.join("tok", coordinator.fingerprint), b.join("tok", coordinator.fingerprint)
    task_a, task_b = a.pull().task, b.pull().task
    assert a.submit(task_a, a.compute(task_a)).accepted  # one accepted result that must never be lost
    yield coordinator, channel, a, b, task_a, task_b, server
    channel.close()
    server.stop(0)


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def counters(server) -> dict[str, int]:
    """The store's counters once the server has written the rejections it counts in memory."""
    server.rejections.flush()
    return server.coordinator.store.counters()


def still_serving_and_nothing_lost(coordinator, a, task_a):
    assert coordinator.store.query("SELECT COUNT(*) FROM results WHERE task_id=?", (task_a.task_id,))[0][0] == 1
    assert a.submit(task_a, a.compute(task_a)).duplicate  # the accepted result is still there, unchanged


def test_wrong_token_unknown_client_and_revoked_enrolment(env):
    coordinator, channel, a, b, task_a, task_b, server = env
    assert (
        code_of(lambda: b.stub.PullTask(pb.PullTaskRequest(client_id=b.client_id, session_token="nope")))
        == grpc.StatusCode.UNAUTHENTICATED
    )
    assert (
        code_of(lambda: b.stub.PullTask(pb.PullTaskRequest(client_id="ghost", session_token=b.session)))
        == grpc.StatusCode.UNAUTHENTICATED
    )
    assert code_of(lambda: b.submit(task_b, [0, 0, 0], session_token="nope")) == grpc.StatusCode.UNAUTHENTICATED
    c = QuadraticDevice(channel, 2)
    assert code_of(lambda: c.join("not-a-token", coordinator.fingerprint)) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: c.join("tok", "f" * 64)) == grpc.StatusCode.FAILED_PRECONDITION
    coordinator.store.add_token("tok2")
    c.join("tok2", coordinator.fingerprint)
    coordinator.store.revoke_token("tok2")
    assert code_of(c.pull) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: c.join("tok2", coordinator.fingerprint)) == grpc.StatusCode.PERMISSION_DENIED
    counts = counters(server)
    assert counts["rejected_bad_token"] == 2 and counts["rejected_unknown_client"] == 1
    assert counts["rejected_token_revoked"] == 1 and counts["rejected_fingerprint"] == 1
    still_serving_and_nothing_lost(coordinator, a, task_a)


def test_nan_scalars_wrong_seeds_wrong_round_and_foreign_tasks(env):
    coordinator, channel, a, b, task_a, task_b, server = env
    good = b.compute(task_b)
    assert code_of(lambda: b.submit(task_b, [math.nan, 1.0, 2.0])) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: b.submit(task_b, good, seeds=task_seeds(task_b)[::-1])) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: b.submit(task_b, good, seeds=task_seeds(task_a))) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: b.submit(task_b, good[:2])) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: b.submit(task_b, good, nonfinite=[7])) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: b.submit(task_b, good, step=task_b.step + 1)) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: b.submit(task_a, good)) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: b.submit(task_b, good, task_id="t-unknown")) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: a.submit(task_a, good)) == grpc.StatusCode.ALREADY_EXISTS  # different content
    # A declared non-finite value is accepted and dropped from the aggregate (and counted).
    flagged = good.copy()
    flagged[1] = 0.0
    assert b.submit(task_b, flagged, nonfinite=[1]).accepted
    counts = counters(server)
    assert counts["rejected_nonfinite"] == 1 and counts["rejected_wrong_seeds"] == 2
    assert counts["rejected_wrong_round"] == 1 and counts["dropped_nonfinite"] == 1
    still_serving_and_nothing_lost(coordinator, a, task_a)


def test_replayed_and_altered_submits_after_the_step_closes(env):
    coordinator, channel, a, b, task_a, task_b, server = env
    c = QuadraticDevice(channel, 2)
    c.join("tok", coordinator.fingerprint)
    task_c = c.pull().task
    assert b.submit(task_b, b.compute(task_b)).accepted
    assert c.submit(task_c, c.compute(task_c)).accepted  # third result: step 0 closes
    assert coordinator.step == 1
    assert a.submit(task_a, a.compute(task_a)).duplicate  # replayed: nothing changes
    assert code_of(lambda: b.submit(task_b, [0.0, 0.0, 0.0])) == grpc.StatusCode.ALREADY_EXISTS  # another result
    assert counters(server)["rejected_duplicate"] == 1


def test_late_results_are_deadline_exceeded(env):
    coordinator, channel, a, b, task_a, task_b, server = env
    with coordinator.store.transaction() as db:  # the task's deadline has passed (but the wave is still open)
        db.execute("UPDATE tasks SET deadline_ms=1 WHERE task_id=?", (task_b.task_id,))
    coordinator.cfg.run.min_results = 10
    assert code_of(lambda: b.submit(task_b, b.compute(task_b))) == grpc.StatusCode.DEADLINE_EXCEEDED
    still_serving_and_nothing_lost(coordinator, a, task_a)


def test_malformed_oversized_and_1000_random_messages(env):
    coordinator, channel, a, b, task_a, task_b, server = env
    raw = {
        m: channel.unary_unary(f"/{SERVICE}/{m}", request_serializer=None, response_deserializer=None)
        for m in ("Join", "PullTask", "Submit", "Heartbeat", "Leave", "FetchHistory", "GetStatus")
    }
    assert code_of(lambda: raw["Submit"](b"\xff\xff\xff\xff\x0f", timeout=5)) == grpc.StatusCode.INVALID_ARGUMENT
    huge = pb.SubmitRequest(client_id=b.client_id, session_token=b.session, task_id=task_b.task_id, jvp=[0.5] * 40_000)
    assert code_of(lambda: b.stub.Submit(huge, timeout=5)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    rng = np.random.default_rng(0)
    codes = {}
    names = sorted(raw)
    for i in range(1_000):
        payload = rng.integers(0, 256, size=int(rng.integers(0, 300)), dtype=np.uint8).tobytes()
        try:
            raw[names[i % len(names)]](payload, timeout=5)
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
        codes[code] = codes.get(code, 0) + 1
    assert grpc.StatusCode.INTERNAL not in codes and grpc.StatusCode.UNAVAILABLE not in codes, codes
    assert codes.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 100  # most random bytes do not parse
    assert counters(server)["rejected_malformed"] >= codes[grpc.StatusCode.INVALID_ARGUMENT]
    still_serving_and_nothing_lost(coordinator, a, task_a)
    assert b.submit(task_b, b.compute(task_b)).accepted  # and new work is still accepted


def test_rate_limit_answers_resource_exhausted(env):
    coordinator, channel, a, b, task_a, task_b, server = env
    coordinator.limiter.rate, coordinator.limiter.burst = 0.001, 3
    coordinator.limiter.buckets.clear()
    replies = []
    for _ in range(6):
        try:
            b.pull()
            replies.append("ok")
        except grpc.RpcError as exc:
            replies.append(exc.code())
    assert replies[:3] == ["ok"] * 3 and set(replies[3:]) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
