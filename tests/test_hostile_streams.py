"""Hostile traffic on the wire: idle streams by the hundred, and floods of garbage and unauthenticated requests.

Streams that send or read nothing take nothing from devices' calls: a thread pool server gave each
open stream a worker, and 32 reflection streams that never sent stopped every step and the health
check. Here 200 streams of each streaming method the server
exposes (health Watch, reflection, FetchParameters) stay open, from an event loop of the test's
own over several connections, while devices complete steps and health checks answer.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import threading
from collections import Counter

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from test_coordinator_crash import Server
from test_coordinator_fixtures import QuadraticDevice, make_bundle

from fwdllm.coordinator import server as coordinator_server
from fwdllm.coordinator.config import from_dict
from fwdllm.coordinator.rounds import Coordinator
from fwdllm.proto.manifest import load_manifest
from fwdllm.proto.v1 import fwdllm_pb2 as pb
from fwdllm.proto.v1 import fwdllm_pb2_grpc as pb_grpc

IDLE = 200  # streams of each method
CONNECTIONS = 10
STEPS = 4
CONFIG = {
    "run": {
        "steps": STEPS,
        "clients_per_step": 3,
        "perturbations_per_client": 2,
        "min_clients": 3,
        "over_select": 0.0,
        "deadline_s": 60,
    },
    "aggregation": {"threads": 1},
    "server": {"rate_per_s": 1000, "rate_burst": 2000, "fetch_chunk_values": 1},
}


class IdleStreams:
    """Streams opened on an event loop of the test's own and left idle there until ``close``."""

    def __init__(self, port: int, client_id: str, session: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port, self.client_id, self.session = port, client_id, session
        self.watches: list = []
        self.reflections: list = []
        self.fetches: list = []
        self.answered = self._on_loop(self._open())

    def _on_loop(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=120)

    async def _open(self) -> dict[str, int]:
        # A local subchannel pool gives each channel its own connection.
        options = [("grpc.use_local_subchannel_pool", 1)]
        self.channels = [
            grpc.aio.insecure_channel(f"127.0.0.1:{self.port}", options=options) for _ in range(CONNECTIONS)
        ]
        answered = {"watch": 0, "reflection": 0}
        for i in range(IDLE):
            channel = self.channels[i % CONNECTIONS]
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            if (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING:
                answered["watch"] += 1  # the server holds this stream; it sends again only on a change
            self.watches.append(watch)
            reflect = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
            if i % 2:  # half ask once and then say nothing more; half never send at all
                await reflect.write(reflection_pb2.ServerReflectionRequest(list_services=""))
                if (await reflect.read()).HasField("list_services_response"):
                    answered["reflection"] += 1
            self.reflections.append(reflect)
            self.fetches.append(  # θ in 1-value chunks, never read
                pb_grpc.FwdLLMStub(channel).FetchParameters(
                    pb.FetchParametersRequest(client_id=self.client_id, session_token=self.session)
                )
            )
        return answered

    def still_open(self) -> dict[str, int]:
        async def count():
            return {
                "watch": sum(not c.done() for c in self.watches),
                "reflection": sum(not c.done() for c in self.reflections),
            }

        return self._on_loop(count())

    def close(self) -> None:
        async def close():
            calls = self.watches + self.reflections + self.fetches
            for call in calls:
                call.cancel()
            await asyncio.gather(*(call.code() for call in calls))  # nothing left to arrive on a closed loop
            for channel in self.channels:
                await channel.close()

        self._on_loop(close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


@pytest.mark.timeout(180)
def test_hundreds_of_idle_streams_do_not_stall_steps_or_health(tmp_path):
    coordinator = Coordinator(make_bundle(tmp_path / "bundle"), tmp_path / "state", from_dict(CONFIG))
    coordinator.store.add_token("tok")
    server = coordinator_server.start(coordinator, "127.0.0.1", 0)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    idle = None
    try:
        devices = [QuadraticDevice(channel, i) for i in range(3)]
        for d in devices:
            d.join("tok", coordinator.fingerprint)
        idle = IdleStreams(server.port, devices[2].client_id, devices[2].session)
        assert idle.answered == {"watch": IDLE, "reflection": IDLE // 2}
        health = health_pb2_grpc.HealthStub(channel)
        status = pb_grpc.FwdLLMStub(channel)
        accepted = 0
        for _ in range(200):
            if coordinator.meta("finished"):
                break
            check = health.Check(health_pb2.HealthCheckRequest(service="fwdllm.v1.FwdLLM"), timeout=60)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
            assert status.GetStatus(pb.GetStatusRequest(), timeout=60).step == coordinator.step
            for d in devices:
                reply = d.pull()
                if reply.WhichOneof("outcome") == "task":
                    accepted += d.submit(reply.task, d.compute(reply.task)).accepted
        assert coordinator.meta("finished") and accepted == 3 * STEPS
        # The idle streams were held open all along.
        assert idle.still_open() == {"watch": IDLE, "reflection": IDLE}
    finally:
        if idle is not None:
            idle.close()
        channel.close()
        server.stop(0)


def send_bytes(channel: grpc.Channel, method: str, payload: bytes) -> None:
    """``payload`` as the request of ``method``, whatever the method's shape."""
    if method.endswith("/ServerReflectionInfo"):
        call = channel.stream_stream(method, request_serializer=None, response_deserializer=None)
        list(call(iter([payload]), timeout=30))
    elif method.endswith(("/Watch", "/FetchParameters")):
        list(channel.unary_stream(method, request_serializer=None, response_deserializer=None)(payload, timeout=30))
    else:
        channel.unary_unary(method, request_serializer=None, response_deserializer=None)(payload, timeout=30)


@pytest.mark.timeout(180)
def test_2000_bad_requests_are_answered_quietly_and_all_counted(tmp_path):
    """Garbage to every service and requests without valid credentials: each answered with its status, none
    with a traceback, the log a few summary lines, and the counters, written in batches, add up."""
    server = Server(tmp_path)
    channel = None
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.start()}")
        device = QuadraticDevice(channel, 0)
        device.join("tok", load_manifest(server.bundle).fingerprint())
        garbage = {  # method -> its request type
            "/grpc.health.v1.Health/Check": health_pb2.HealthCheckRequest,
            "/grpc.health.v1.Health/Watch": health_pb2.HealthCheckRequest,
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": reflection_pb2.ServerReflectionRequest,
            "/fwdllm.v1.FwdLLM/Submit": pb.SubmitRequest,
            "/fwdllm.v1.FwdLLM/Join": pb.JoinRequest,
            "/fwdllm.v1.FwdLLM/FetchParameters": pb.FetchParametersRequest,
        }
        stub = pb_grpc.FwdLLMStub(channel)
        unauthenticated = {
            "rejected_bad_token": lambda: stub.PullTask(
                pb.PullTaskRequest(client_id=device.client_id, session_token="stolen"), timeout=30
            ),
            "rejected_unknown_client": lambda: stub.Heartbeat(
                pb.HeartbeatRequest(client_id="ghost", session_token="x"), timeout=30
            ),
            "rejected_token_unknown": lambda: stub.Join(
                pb.JoinRequest(protocol_version=pb.PROTOCOL_VERSION_1, enrolment_token="guess"), timeout=30
            ),
        }
        rng = np.random.default_rng(0)
        sent: Counter[str] = Counter()
        codes: Counter[str] = Counter()
        kinds = [*garbage, *unauthenticated]
        for i in range(2000):
            kind = kinds[i % len(kinds)]
            if kind in garbage:
                payload = b"\x0f" + rng.integers(0, 256, size=int(rng.integers(0, 60)), dtype=np.uint8).tobytes()
                with pytest.raises(DecodeError):  # field 1 with wire type 7: never a valid message
                    garbage[kind].FromString(payload)
                send = functools.partial(send_bytes, channel, kind, payload)
                sent["rejected_malformed"] += 1
            else:
                send = unauthenticated[kind]
                sent[kind] += 1
            with pytest.raises(grpc.RpcError) as info:
                send()
            codes[info.value.code().name] += 1
        assert codes == {
            "INVALID_ARGUMENT": sent["rejected_malformed"],
            "UNAUTHENTICATED": 2000 - sent["rejected_malformed"],
        }
    finally:
        if channel is not None:
            channel.close()
        server.stop()  # SIGTERM: the last counts are written and logged
    with sqlite3.connect(server.state / "coordinator.sqlite") as db:
        counters = dict(db.execute("SELECT name, value FROM counters WHERE name LIKE 'rejected_%'"))
    assert counters == sent and sum(counters.values()) == 2000
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log
    summaries = [line for line in log.splitlines() if "rejected" in line]
    assert 1 <= len(summaries) <= 20 and len(log.splitlines()) < 100, log[-3000:]


@pytest.mark.timeout(180)
def test_devices_complete_steps_while_peers_flood_the_server_with_bad_requests(tmp_path):
    """Joins with guessed tokens, calls with stolen client ids and garbage, from four threads without pause:
    the devices' steps still complete (the flood only shares the server, never holds it)."""
    coordinator = Coordinator(make_bundle(tmp_path / "bundle"), tmp_path / "state", from_dict(CONFIG))
    coordinator.store.add_token("tok")
    server = coordinator_server.start(coordinator, "127.0.0.1", 0)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stop, sent = threading.Event(), Counter()
    flooders: list[threading.Thread] = []
    try:
        devices = [QuadraticDevice(channel, i) for i in range(3)]
        for d in devices:
            d.join("tok", coordinator.fingerprint)

        def flood(i: int) -> None:
            own = grpc.insecure_channel(f"127.0.0.1:{server.port}", options=[("grpc.use_local_subchannel_pool", 1)])
            stub = pb_grpc.FwdLLMStub(own)
            calls = [
                lambda: stub.Join(pb.JoinRequest(protocol_version=pb.PROTOCOL_VERSION_1, enrolment_token="guess")),
                lambda: stub.PullTask(pb.PullTaskRequest(client_id=devices[0].client_id, session_token="stolen")),
                lambda: send_bytes(own, "/fwdllm.v1.FwdLLM/Submit", b"\x0f\xff"),
            ]
            while not stop.is_set():
                with pytest.raises(grpc.RpcError):
                    calls[sent[i] % len(calls)]()
                sent[i] += 1
            own.close()

        flooders.extend(threading.Thread(target=flood, args=(i,), daemon=True) for i in range(4))
        for t in flooders:
            t.start()
        accepted = 0
        while not coordinator.meta("finished"):
            for d in devices:
                reply = d.pull()
                if reply.WhichOneof("outcome") == "task":
                    accepted += d.submit(reply.task, d.compute(reply.task)).accepted
        flooded = sum(sent.values())
        assert accepted == 3 * STEPS and flooded > 0
    finally:
        stop.set()
        for t in flooders:
            t.join()
        channel.close()
        server.stop(0)
