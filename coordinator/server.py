"""The gRPC server around a Coordinator: TLS, message limits, health, reflection, bad-input handling.

A thin adapter: wire.py converts the messages, this maps a ``Reject``'s reason to its status
code. Methods are registered by hand (not with the generated ``add_FwdLLMServicer_to_server``) so
that a request that does not parse reaches a handler as ``Malformed`` and is answered
INVALID_ARGUMENT and counted, like every other rejected request, instead of an anonymous
INTERNAL. A bug in one request is answered INTERNAL and logged; the server keeps serving.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tqdm import tqdm

from fwdllm.coordinator.messages import Reason, Reject
from fwdllm.coordinator.rounds import Coordinator
from fwdllm.coordinator.wire import ProtoCoordinator
from fwdllm.errors import UserError
from fwdllm.proto.v1 import fwdllm_pb2 as pb

log = logging.getLogger("fwdllm.coordinator.server")

SERVICE = "fwdllm.v1.FwdLLM"
TICK_S = 0.2

GRPC_STATUS = {
    Reason.UNKNOWN_CLIENT: grpc.StatusCode.UNAUTHENTICATED,
    Reason.INACTIVE_CLIENT: grpc.StatusCode.UNAUTHENTICATED,
    Reason.BAD_TOKEN: grpc.StatusCode.UNAUTHENTICATED,
    Reason.RATE_LIMITED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.PROTOCOL: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.TOKEN_UNKNOWN: grpc.StatusCode.UNAUTHENTICATED,
    Reason.TOKEN_REVOKED: grpc.StatusCode.PERMISSION_DENIED,
    Reason.FINGERPRINT: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.SEED_SPACE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.UNKNOWN_TASK: grpc.StatusCode.NOT_FOUND,
    Reason.NOT_YOUR_TASK: grpc.StatusCode.PERMISSION_DENIED,
    Reason.WRONG_ROUND: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.STALE: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.CANCELLED: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.LATE: grpc.StatusCode.DEADLINE_EXCEEDED,
    Reason.WRONG_SEEDS: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.MALFORMED: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.NONFINITE: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.DUPLICATE: grpc.StatusCode.ALREADY_EXISTS,
    Reason.UNKNOWN_VERSION: grpc.StatusCode.NOT_FOUND,
}


@dataclass
class Malformed:
    error: str
    size: int


class Servicer:
    def __init__(self, coordinator: Coordinator):
        self.c, self.proto = coordinator, ProtoCoordinator(coordinator)

    def _fail(self, context, code: grpc.StatusCode, counter: str, message: str, method: str):
        self.c.count(counter)
        log.warning("%s from %s rejected (%s): %s", method, context.peer(), code.name, message)
        context.abort(code, message)

    def _unary(self, method: str, fn, request, context):
        if isinstance(request, Malformed):
            self._fail(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "rejected_malformed",
                f"the {request.size}-byte request is not a valid {method} message ({request.error})",
                method,
            )
        try:
            return fn(request)
        except Reject as r:
            self._fail(context, GRPC_STATUS[r.reason], r.counter, r.message, method)
        except Exception:  # one bad request must never stop the server
            log.exception("%s failed", method)
            self.c.count("internal_errors")
            context.abort(grpc.StatusCode.INTERNAL, f"{method} failed on the server; see its log")

    def handler(self) -> grpc.GenericRpcHandler:
        c = self.proto

        def unary(method, fn, request_type):
            def behaviour(request, context):
                return self._unary(method, fn, request, context)

            return grpc.unary_unary_rpc_method_handler(
                behaviour,
                request_deserializer=_parser(request_type),
                response_serializer=lambda m: m.SerializeToString(),
            )

        def fetch(request, context):
            if isinstance(request, Malformed):
                self._fail(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "rejected_malformed",
                    f"not a valid FetchParameters message ({request.error})",
                    "FetchParameters",
                )
            try:
                yield from c.fetch_parameters(request)
            except Reject as r:
                self._fail(context, GRPC_STATUS[r.reason], r.counter, r.message, "FetchParameters")

        handlers = {
            "Join": unary("Join", c.join, pb.JoinRequest),
            "PullTask": unary("PullTask", c.pull_task, pb.PullTaskRequest),
            "Submit": unary("Submit", lambda r: c.submit(r, r.ByteSize()), pb.SubmitRequest),
            "Heartbeat": unary("Heartbeat", c.heartbeat, pb.HeartbeatRequest),
            "Leave": unary("Leave", c.leave, pb.LeaveRequest),
            "FetchHistory": unary("FetchHistory", c.fetch_history, pb.FetchHistoryRequest),
            "GetStatus": unary("GetStatus", lambda r: c.status(), pb.GetStatusRequest),
            "FetchParameters": grpc.unary_stream_rpc_method_handler(
                fetch,
                request_deserializer=_parser(pb.FetchParametersRequest),
                response_serializer=lambda m: m.SerializeToString(),
            ),
        }
        return grpc.method_handlers_generic_handler(SERVICE, handlers)


def _parser(message_type):
    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except Exception as exc:  # protobuf raises DecodeError and, on some inputs, others
            return Malformed(f"{type(exc).__name__}: {exc}"[:200], len(data))

    return parse


class RunningServer:
    """A started server plus the ticker that moves deadlines on; ``stop`` ends both."""

    def __init__(self, coordinator: Coordinator, server: grpc.Server, port: int, health_servicer):
        self.coordinator, self.server, self.port, self.health = coordinator, server, port, health_servicer
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="coordinator-tick", daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                self.coordinator.tick()
            except Exception:
                log.exception("coordinator tick failed")

    def stop(self, grace: float = 1.0) -> None:
        self._stop.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self._ticker.join()
        self.coordinator.close()


def start(
    coordinator: Coordinator,
    host: str = "127.0.0.1",
    port: int = 0,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
) -> RunningServer:
    scfg = coordinator.cfg.server
    options = [
        ("grpc.max_receive_message_length", scfg.max_message_bytes),
        ("grpc.max_send_message_length", scfg.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=scfg.workers),
        options=options,
        maximum_concurrent_rpcs=max(64, 64 * scfg.workers),
    )
    server.add_generic_rpc_handlers((Servicer(coordinator).handler(),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in (SERVICE, ""):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (
            pb.DESCRIPTOR.services_by_name["FwdLLM"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = f"{host}:{port}"
    if (tls_cert is None) != (tls_key is None):
        raise UserError("give both --tls-cert and --tls-key, or neither")
    try:
        if tls_cert is not None and tls_key is not None:  # both or neither, checked above
            creds = grpc.ssl_server_credentials([(Path(tls_key).read_bytes(), Path(tls_cert).read_bytes())])
            bound = server.add_secure_port(address, creds)
        else:
            bound = server.add_insecure_port(address)
    except (OSError, RuntimeError) as exc:
        raise UserError(f"cannot listen on {address} ({exc}); choose another --host/--port") from exc
    if not bound:
        raise UserError(
            f"cannot listen on {address}: the port is taken or the host is not local; choose another --port"
        )
    server.start()
    return RunningServer(coordinator, server, bound, health_servicer)


def serve_forever(running: RunningServer, endpoint_file: Path | None = None, exit_when_finished: bool = False) -> None:
    """Block until SIGINT/SIGTERM (or the run's end); write the bound port to ``endpoint_file`` once listening."""
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    if endpoint_file is not None:
        tmp = Path(str(endpoint_file) + ".tmp")
        tmp.write_text(f"{running.port}\n")
        tmp.replace(endpoint_file)
    finished_since = None
    c = running.coordinator
    bar = tqdm(total=c.cfg.run.steps, initial=c.step, desc="steps", unit="step", disable=None)
    while not done.wait(0.5):
        if c.step != bar.n:
            bar.update(c.step - bar.n)
            row = c.store.last_metrics()
            if row:
                bar.set_postfix(
                    {
                        k: f"{row[k]:.4g}"
                        for k in ("loss", "accuracy", "perturbations")
                        if isinstance(row.get(k), (int, float))
                    }
                )
        if exit_when_finished and c.run.finished:
            # Give devices a few heartbeats to hear run_finished before the port closes.
            finished_since = finished_since or time.monotonic()
            if time.monotonic() - finished_since > 2 * running.coordinator.cfg.server.heartbeat_ms / 1000:
                break
    bar.close()
    running.stop()
