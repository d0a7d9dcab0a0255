"""The gRPC server around a Coordinator: TLS, message limits, health, reflection, bad-input handling.

A thin adapter: wire.py converts the messages, this maps a ``Reject``'s reason to its status code.
It is an asyncio server (grpc.aio) on a thread of its own: an open stream is a coroutine, not a
worker thread, so no number of streams that send or read nothing (health ``Watch``, reflection,
``FetchParameters``) takes capacity from devices' calls, as they did from a thread pool server.
The core is synchronous; its calls run on a bounded thread pool, serialised by its lock as ever,
and Join and GetStatus, which anyone may call, have a small pool of their own, so callers without a
session never occupy the threads of joined devices. Connections are pinged and recycled, so a dead
peer's streams end.

A request that does not parse reaches no servicer, health and reflection included: the interceptor
answers it INVALID_ARGUMENT (gRPC itself would log a traceback and answer UNKNOWN). Rejected requests
are counted in memory, written to the store in one transaction per tick, and logged as one summary
line at most every ``LOG_EVERY_S``, so a flood of bad requests costs neither a write nor a log line
each. A bug in one request is answered INTERNAL and logged with its traceback; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import ssl
import threading
import time
from collections import Counter
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
LOG_EVERY_S = 10.0  # at most one summary line of rejected requests per this many seconds
OPEN_WORKERS = 4  # threads for Join and GetStatus, which need no session
#: Set to 1 only by a crash test: the process SIGKILLs itself once a result is committed, before the reply.
KILL_AFTER_COMMIT_ENV = "FWDLLM_TEST_KILL_AFTER_SUBMIT_COMMIT"

OPTIONS = [
    ("grpc.so_reuseport", 0),
    ("grpc.max_concurrent_streams", 1000),  # per connection: a device needs three, a simulator process more
    ("grpc.keepalive_time_ms", 60_000),  # ping every peer each minute ...
    ("grpc.keepalive_timeout_ms", 20_000),  # ... and close the connection of one that does not answer
    ("grpc.max_connection_idle_ms", 300_000),  # close connections without calls for 5 minutes
    ("grpc.max_connection_age_ms", 3_600_000),  # recycle every connection after an hour ...
    ("grpc.max_connection_age_grace_ms", 600_000),  # ... giving its calls 10 minutes to finish
]

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


class Rejections:
    """Rejected requests, counted in memory: ``flush`` writes the counts in one transaction and logs
    one line of them when ``LOG_EVERY_S`` has passed since the last."""

    def __init__(self, coordinator: Coordinator):
        self.c = coordinator
        self.lock = threading.Lock()
        self.unsaved: Counter[str] = Counter()
        self.unlogged: Counter[str] = Counter()
        self.last: dict[str, str] = {}  # counter -> the latest such rejection, for the log line
        self.logged_at = -LOG_EVERY_S

    def add(self, counter: str, what: str) -> None:
        with self.lock:
            self.unsaved[counter] += 1
            self.unlogged[counter] += 1
            self.last[counter] = what

    def flush(self, log_now: bool = False) -> None:
        with self.lock:
            unsaved, self.unsaved = self.unsaved, Counter()
            now = time.monotonic()
            summary = ""
            if self.unlogged and (log_now or now - self.logged_at >= LOG_EVERY_S):
                parts = [f"{name} {n} (last: {self.last[name]})" for name, n in self.unlogged.most_common()]
                summary = f"rejected {sum(self.unlogged.values())} requests: " + "; ".join(parts)
                self.unlogged, self.last, self.logged_at = Counter(), {}, now
        if unsaved:
            try:
                with self.c.store.transaction():
                    for name, n in unsaved.items():
                        self.c.store.bump(name, n)
            except BaseException:
                with self.lock:
                    self.unsaved.update(unsaved)
                raise
        if summary:
            log.warning("%s", summary)


def _parser(deserialize):
    def parse(data: bytes):
        try:
            return deserialize(data)
        except Exception as exc:  # protobuf raises DecodeError and, on some inputs, others
            return Malformed(f"{type(exc).__name__}: {exc}"[:200], len(data))

    return parse


class RejectMalformed(grpc.aio.ServerInterceptor):
    """Every method's request parser returns ``Malformed`` instead of raising, and its handler answers
    that INVALID_ARGUMENT, counted, before the servicer sees it."""

    def __init__(self, rejections: Rejections):
        self.rejections = rejections

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]

        async def refuse(request: Malformed, context):
            message = f"the {request.size}-byte request is not a valid {method} message ({request.error})"
            self.rejections.add("rejected_malformed", f"{method} from {context.peer()}: {message}")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

        async def checked(requests, context):
            async for request in requests:
                if isinstance(request, Malformed):
                    await refuse(request, context)
                yield request

        kind = ("stream" if handler.request_streaming else "unary") + "_"
        kind += "stream" if handler.response_streaming else "unary"
        inner = getattr(handler, kind)

        if inspect.isasyncgenfunction(inner):

            async def behaviour(request, context):
                if handler.request_streaming:
                    request = checked(request, context)
                elif isinstance(request, Malformed):
                    await refuse(request, context)
                async for response in inner(request, context):
                    yield response

        else:

            async def behaviour(request, context):  # type: ignore[misc]  # the other shape of handler
                if handler.request_streaming:
                    request = checked(request, context)
                elif isinstance(request, Malformed):
                    await refuse(request, context)
                return await inner(request, context)

        return handler._replace(request_deserializer=_parser(handler.request_deserializer), **{kind: behaviour})


class WorkSignal:
    """Wakes the PullTask calls the server holds when the core's work changes (``Coordinator.work_key``):
    checked after every core call and tick, from any thread; the waiters are on the event loop."""

    def __init__(self, coordinator: Coordinator, loop: asyncio.AbstractEventLoop):
        self.c, self.loop = coordinator, loop
        self.key = coordinator.work_key()
        self.event = asyncio.Event()  # set, and replaced by a fresh one, at each change
        self._lock = threading.Lock()

    def check(self) -> None:
        with self._lock:
            key = self.c.work_key()
            if key == self.key:
                return
            self.key = key
        self.loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        self.event.set()
        self.event = asyncio.Event()


class Servicer:
    """The fwdllm methods: each runs its core call on a thread pool and maps a ``Reject`` to its status.

    A PullTask that finds no task for its device is held, up to the ``wait_ms`` it asks for (at most
    ``server.pull_hold_ms``), and asked again whenever the work changes: a thousand idle devices then cost
    a coroutine each and one core call per change, where polling cost two calls per second each."""

    def __init__(self, coordinator: Coordinator, rejections: Rejections, loop: asyncio.AbstractEventLoop):
        self.c, self.proto, self.rejections = coordinator, ProtoCoordinator(coordinator), rejections
        self.work = WorkSignal(coordinator, loop)
        workers = coordinator.cfg.server.workers
        self.pool = futures.ThreadPoolExecutor(workers, thread_name_prefix="coordinator-call")
        self.open_pool = futures.ThreadPoolExecutor(OPEN_WORKERS, thread_name_prefix="coordinator-open")
        self.kill_after_commit = os.environ.get(KILL_AFTER_COMMIT_ENV) == "1"

    def _checked(self, fn, *args):
        """``fn`` on a pool thread, then whether it changed the work held pulls wait for: reading the core's state
        may wait for its lock, which must never stall the event loop."""
        try:
            return fn(*args)
        finally:
            self.work.check()

    async def _run(self, method: str, context, pool, fn, *args):
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, self._checked, fn, *args)
        except Reject as r:
            code, counter, message = GRPC_STATUS[r.reason], r.counter, r.message
        except Exception:  # one bad request must never stop the server
            log.exception("%s failed", method)
            code, counter, message = grpc.StatusCode.INTERNAL, "internal_errors", f"{method} failed; see the server log"
        self.rejections.add(counter, f"{method} from {context.peer()}, {code.name}: {message}")
        await context.abort(code, message)

    async def _pull(self, request: pb.PullTaskRequest, context) -> pb.PullTaskResponse:
        loop = asyncio.get_running_loop()
        until = loop.time() + min(request.wait_ms, self.c.cfg.server.pull_hold_ms) / 1000
        while True:
            changed = self.work.event  # taken before the call: a change during it still wakes this wait
            response = await self._run("PullTask", context, self.pool, self.proto.pull_task, request)
            left = until - loop.time()
            if response.WhichOneof("outcome") != "retry_after_ms" or left <= 0:
                return response
            try:
                await asyncio.wait_for(changed.wait(), left)
            except TimeoutError:
                # asked once more at the end, so the device counts as asking for work; then it pulls again at once
                response = await self._run("PullTask", context, self.pool, self.proto.pull_task, request)
                if response.WhichOneof("outcome") == "retry_after_ms":
                    response.retry_after_ms = 0
                return response

    def _submit(self, request: pb.SubmitRequest) -> pb.SubmitResponse:
        response = self.proto.submit(request, request.ByteSize())
        if self.kill_after_commit and not response.duplicate:
            os.kill(os.getpid(), signal.SIGKILL)
        return response

    def _status(self, token: str | None) -> pb.StatusResponse:
        """All of the status to holders of an enrolment token (or to anyone with ``server.status_access =
        "public"``); without a token, only what the run's progress shows."""
        if self.c.cfg.server.status_access != "public" and token is not None:
            state = self.c.store.token_state(token)
            if state != "valid":
                raise Reject(
                    Reason.TOKEN_REVOKED if state == "revoked" else Reason.TOKEN_UNKNOWN,
                    f"enrolment token is {state}; the full status needs a valid one (`fwdllm coordinator token`)",
                )
        self.rejections.flush()  # the counters include rejections not yet written
        full = self.proto.status()
        if self.c.cfg.server.status_access == "public" or token is not None:
            return full
        return pb.StatusResponse(
            model_fingerprint=full.model_fingerprint,
            step=full.step,
            theta_version=full.theta_version,
            finished=full.finished,
        )

    def handler(self) -> grpc.GenericRpcHandler:
        c = self.proto

        def unary(method, fn, request_type, pool=self.pool):
            async def behaviour(request, context):
                return await self._run(method, context, pool, fn, request)

            return grpc.unary_unary_rpc_method_handler(
                behaviour,
                request_deserializer=request_type.FromString,
                response_serializer=lambda m: m.SerializeToString(),
            )

        async def fetch(request, context):
            chunks = c.fetch_parameters(request)  # a generator: each chunk is computed on the pool
            while (chunk := await self._run("FetchParameters", context, self.pool, next, chunks, None)) is not None:
                yield chunk

        async def status(request, context):
            auth = dict(context.invocation_metadata() or ()).get("authorization")
            token = auth.removeprefix("Bearer ").strip() if auth else None
            return await self._run("GetStatus", context, self.open_pool, self._status, token)

        handlers = {
            "Join": unary("Join", c.join, pb.JoinRequest, self.open_pool),
            "PullTask": grpc.unary_unary_rpc_method_handler(
                self._pull,
                request_deserializer=pb.PullTaskRequest.FromString,
                response_serializer=lambda m: m.SerializeToString(),
            ),
            "Submit": unary("Submit", self._submit, pb.SubmitRequest),
            "Heartbeat": unary("Heartbeat", c.heartbeat, pb.HeartbeatRequest),
            "Leave": unary("Leave", c.leave, pb.LeaveRequest),
            "FetchHistory": unary("FetchHistory", c.fetch_history, pb.FetchHistoryRequest),
            "GetStatus": grpc.unary_unary_rpc_method_handler(
                status,
                request_deserializer=pb.GetStatusRequest.FromString,
                response_serializer=lambda m: m.SerializeToString(),
            ),
            "FetchParameters": grpc.unary_stream_rpc_method_handler(
                fetch,
                request_deserializer=pb.FetchParametersRequest.FromString,
                response_serializer=lambda m: m.SerializeToString(),
            ),
        }
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.open_pool.shutdown(wait=True, cancel_futures=True)


class RunningServer:
    """A started server on its event loop thread, plus the ticker that moves deadlines on and writes the
    rejection counts; ``stop`` ends them."""

    def __init__(self, coordinator: Coordinator, address: str, credentials: grpc.ServerCredentials | None):
        self.coordinator = coordinator
        self.rejections = Rejections(coordinator)
        self.loop = asyncio.new_event_loop()
        self.servicer = Servicer(coordinator, self.rejections, self.loop)
        self._loop_thread = threading.Thread(target=self.loop.run_forever, name="coordinator-grpc", daemon=True)
        self._loop_thread.start()
        try:
            self.port = self._on_loop(self._serve(address, credentials))
        except BaseException:
            self._end_loop()
            raise
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="coordinator-tick", daemon=True)
        self._ticker.start()

    def _on_loop(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    async def _serve(self, address: str, credentials: grpc.ServerCredentials | None) -> int:
        scfg = self.coordinator.cfg.server
        options = [
            *OPTIONS,
            ("grpc.max_receive_message_length", scfg.max_message_bytes),
            ("grpc.max_send_message_length", scfg.max_message_bytes),
        ]
        self.server = grpc.aio.server(interceptors=[RejectMalformed(self.rejections)], options=options)
        self.server.add_generic_rpc_handlers((self.servicer.handler(),))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        for name in (SERVICE, ""):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection(
            (
                pb.DESCRIPTOR.services_by_name["FwdLLM"].full_name,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.server,
        )
        try:
            if credentials is not None:
                bound = self.server.add_secure_port(address, credentials)
            else:
                bound = self.server.add_insecure_port(address)
        except (OSError, RuntimeError) as exc:
            raise UserError(f"cannot listen on {address} ({exc}); choose another --host/--port") from exc
        if not bound:
            raise UserError(
                f"cannot listen on {address}: the port is taken or the host is not local; choose another --port"
            )
        await self.server.start()
        return bound

    def _tick(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                self.coordinator.tick()
                self.servicer.work.check()
                self.rejections.flush()
            except Exception:
                log.exception("coordinator tick failed")

    async def _shutdown(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)

    def _end_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._loop_thread.join()
        self.loop.close()

    def stop(self, grace: float = 1.0) -> None:
        self._stop.set()
        self._on_loop(self._shutdown(grace))
        self._ticker.join()
        self.servicer.close()
        self._end_loop()
        self.rejections.flush(log_now=True)
        self.coordinator.close()


def server_credentials(
    tls_cert: Path | None, tls_key: Path | None, tls_client_ca: Path | None = None
) -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files, each checked first so that a bad one is named; None without TLS.
    With ``tls_client_ca``, devices must present a certificate it signed (mutual TLS)."""
    if (tls_cert is None) != (tls_key is None):
        raise UserError("give both --tls-cert and --tls-key, or neither")
    if tls_cert is None or tls_key is None:
        if tls_client_ca is not None:
            raise UserError("--tls-client-ca needs --tls-cert and --tls-key (client certificates need TLS)")
        return None
    cert, key = _read_pem("--tls-cert", tls_cert), _read_pem("--tls-key", tls_key)
    _check_certificates("--tls-cert", tls_cert, cert)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(tls_cert, tls_key, password=lambda: b"")
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            raise UserError(
                f"--tls-key {tls_key} does not match --tls-cert {tls_cert}; pass the key of that certificate"
            ) from None
        raise UserError(f"--tls-key {tls_key} is not an unencrypted PEM private key ({exc.reason or exc})") from None
    client_ca = None
    if tls_client_ca is not None:
        client_ca = _read_pem("--tls-client-ca", tls_client_ca)
        _check_certificates("--tls-client-ca", tls_client_ca, client_ca)
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _read_pem(option: str, path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {option} {path} ({exc.strerror or exc})") from None


def _check_certificates(option: str, path: Path, data: bytes) -> None:
    try:
        ssl.create_default_context(cadata=data.decode("ascii"))
    except (ssl.SSLError, ValueError, UnicodeDecodeError):
        raise UserError(f"{option} {path} is not a PEM certificate (-----BEGIN CERTIFICATE-----)") from None


def start(
    coordinator: Coordinator,
    host: str = "127.0.0.1",
    port: int = 0,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    tls_client_ca: Path | None = None,
) -> RunningServer:
    return RunningServer(coordinator, f"{host}:{port}", server_credentials(tls_cert, tls_key, tls_client_ca))


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
