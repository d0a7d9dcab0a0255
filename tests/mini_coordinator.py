"""A small in-memory gRPC coordinator for the device client's tests: just enough of the v1 contract
(joins, θ downloads, history, tasks, submissions, leaving) to drive a real DeviceClient or `fwdllm device run`.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections import Counter
from concurrent import futures

import grpc
import pytest
from device_standin import TEXTS, shared_backend, shared_bundle, write_jsonl

from fwdllm.device_runtime.client import ClientConfig, DeviceClient
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
        self.pull_wait_ms = 0  # Join's offer to hold pulls (the real coordinator's server.pull_wait_ms)
        self.pulls: list[pb.PullTaskRequest] = []
        self.beats: list[pb.HeartbeatRequest] = []
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
        secret = "" if request.previous_client_id else f"secret-of-{client_id}"  # a stand-in: rejoins are not checked
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
            client_secret=secret,
            pull_wait_ms=self.pull_wait_ms,
        )

    def PullTask(self, request, context):
        self._auth(request, context)
        self.pulls.append(request)
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
        self.beats.append(request)
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
