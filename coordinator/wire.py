"""The coordinator core spoken to in protobuf messages: conversions both ways, and the byte counts.

The gRPC servicer (server.py) calls this; so can an in-process driver that already holds
protobuf messages. What a device downloads (tasks, θ chunks, history) is counted in the step's
``bytes_down`` here, where the serialized sizes are known. The history answer's exact size is
checked here too, against the request's ``max_bytes``, because only the wire format has a size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fwdllm.coordinator.config import CoordinatorConfig
from fwdllm.coordinator.messages import (
    Capabilities,
    Credentials,
    History,
    HistoryQuery,
    HistoryRefusal,
    JoinRequest,
    Submission,
    TaskOffer,
)
from fwdllm.coordinator.rounds import Coordinator
from fwdllm.coordinator.updates import Evaluator
from fwdllm.proto.names import DifferenceScheme, Distribution
from fwdllm.proto.v1 import fwdllm_pb2 as pb

REFUSAL = {
    HistoryRefusal.NOT_REPLAYABLE: pb.HISTORY_NOT_REPLAYABLE,
    HistoryRefusal.NOT_KEPT: pb.HISTORY_NOT_KEPT,
    HistoryRefusal.OVER_CAP: pb.HISTORY_OVER_CAP,
}


def credentials(req) -> Credentials:
    return Credentials(req.client_id, req.session_token)


def task_message(offer: TaskOffer) -> pb.Task:
    t = offer.task
    task = pb.Task(
        task_id=t.task_id,
        step=t.step,
        wave=t.wave,
        theta_version=t.theta_version,
        distribution=Distribution(offer.distribution).wire,
        epsilon=offer.epsilon,
        scheme=DifferenceScheme(offer.scheme).wire,
        batch=pb.BatchRef(start=t.batch_start, size=t.batch_size),
        deadline_unix_ms=t.deadline_ms,
    )
    if t.explicit:
        task.seeds.extend(int(s) for s in t.seeds)
    else:
        task.seed_ranges.append(pb.SeedRange(start=int(t.seeds[0]), count=len(t.seeds)))
    return task


def history_message(history: History) -> pb.FetchHistoryResponse:
    if history.refusal is not None:
        return pb.FetchHistoryResponse(available=False, theta_dim=history.theta_dim, refusal=REFUSAL[history.refusal])
    dist = Distribution(history.distribution).wire
    return pb.FetchHistoryResponse(
        available=True,
        theta_dim=history.theta_dim,
        updates=[
            pb.UpdateRecord(
                version=u.version,
                lr=u.lr,
                seeds=u.seeds.tolist(),
                coefficients=u.coefficients.tolist(),
                distribution=dist,
            )
            for u in history.updates
        ],
    )


class ProtoCoordinator:
    """A core ``Coordinator`` behind protobuf requests and responses; a refusal stays a ``Reject``."""

    def __init__(self, core: Coordinator):
        self.core = core

    def join(self, req: pb.JoinRequest) -> pb.JoinResponse:
        c = req.capabilities
        joined = self.core.join(
            JoinRequest(
                enrolment_token=req.enrolment_token,
                model_fingerprint=req.model_fingerprint,
                protocol_version=int(req.protocol_version),
                client_name=req.client_name,
                num_examples=int(req.num_examples),
                previous_client_id=req.previous_client_id,
                client_secret=req.client_secret,
                capabilities=Capabilities(
                    backend=c.backend,
                    cpu_count=c.cpu_count,
                    memory_bytes=c.memory_bytes,
                    precision=c.precision,
                    abi=c.abi,
                    os=c.os,
                    max_perturbations_per_call=c.max_perturbations_per_call,
                ),
            )
        )
        return pb.JoinResponse(
            client_id=joined.client_id,
            session_token=joined.session_token,
            protocol_version=pb.PROTOCOL_VERSION_1,
            model_fingerprint=joined.model_fingerprint,
            theta_dim=joined.theta_dim,
            theta_version=joined.theta_version,
            heartbeat_interval_ms=joined.heartbeat_interval_ms,
            client_secret=joined.client_secret,
            pull_wait_ms=self.core.cfg.server.pull_hold_ms,
        )

    def leave(self, req: pb.LeaveRequest) -> pb.LeaveResponse:
        self.core.leave(credentials(req))
        return pb.LeaveResponse()

    def pull_task(self, req: pb.PullTaskRequest) -> pb.PullTaskResponse:
        pulled = self.core.pull(credentials(req))
        if pulled.run_finished:
            return pb.PullTaskResponse(run_finished=True)
        if pulled.offer is None:
            return pb.PullTaskResponse(retry_after_ms=pulled.retry_after_ms)
        response = pb.PullTaskResponse(task=task_message(pulled.offer))
        self.core.count_down(response.ByteSize())
        return response

    def submit(self, req: pb.SubmitRequest, nbytes: int) -> pb.SubmitResponse:
        receipt = self.core.submit(
            Submission(
                who=credentials(req),
                task_id=req.task_id,
                step=int(req.step),
                seeds=np.asarray(req.seeds, dtype=np.uint64),
                jvp=np.asarray(req.jvp, dtype=np.float32),
                nonfinite=np.asarray(req.nonfinite, dtype=np.int64),
                loss_mean=float(req.loss.mean),
                num_examples=int(req.num_examples),
                nbytes=int(nbytes),
            )
        )
        return pb.SubmitResponse(accepted=True, duplicate=receipt.duplicate, message=receipt.message)

    def heartbeat(self, req: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        beat = self.core.heartbeat(credentials(req))
        return pb.HeartbeatResponse(
            cancel_task_ids=beat.cancel_task_ids,
            theta_version=beat.theta_version,
            server_time_unix_ms=beat.server_time_ms,
        )

    def fetch_parameters(self, req: pb.FetchParametersRequest) -> Iterator[pb.ParameterChunk]:
        """θ in chunks that fit a message; the last one carries the whole vector's sha256."""
        version, theta = self.core.fetch_parameters(credentials(req), int(req.version))
        server = self.core.cfg.server
        chunk = int(req.chunk_values) or server.fetch_chunk_values
        chunk = max(1, min(chunk, server.max_message_bytes // 4 - 64))
        data = theta.astype("<f4").tobytes()
        digest, dim = hashlib.sha256(data).hexdigest(), theta.size
        for offset in range(0, dim, chunk):
            last = offset + chunk >= dim
            msg = pb.ParameterChunk(
                version=version,
                offset=offset,
                total=dim,
                values=data[4 * offset : 4 * min(dim, offset + chunk)],
                sha256=digest if last else "",
            )
            self.core.count_down(msg.ByteSize())
            yield msg

    def fetch_history(self, req: pb.FetchHistoryRequest) -> pb.FetchHistoryResponse:
        """History within ``max_bytes`` as serialized, or the refusal: either is counted in ``bytes_down``,
        so a device that asks with ``max_bytes`` = θ's size never costs more than θ."""
        query = HistoryQuery(
            who=credentials(req),
            from_version=int(req.from_version),
            to_version=int(req.to_version),
            max_seeds=int(req.max_seeds),
            max_bytes=int(req.max_bytes),
        )
        history = self.core.fetch_history(query)
        response = history_message(history)
        if req.max_bytes and response.ByteSize() > req.max_bytes:
            response = history_message(
                History(history.theta_dim, history.distribution, refusal=HistoryRefusal.OVER_CAP)
            )
        self.core.count_down(response.ByteSize())
        return response

    def status(self) -> pb.StatusResponse:
        s = self.core.status()
        return pb.StatusResponse(
            model_fingerprint=s.model_fingerprint,
            step=s.step,
            theta_version=s.theta_version,
            clients_registered=s.clients_registered,
            clients_active=s.clients_active,
            counters=s.counters,
            metrics=s.metrics,
            finished=s.finished,
        )


class InProcessCoordinator(ProtoCoordinator):
    """A coordinator of its own, driven in process with protobuf messages (simulation harnesses)."""

    def __init__(
        self, bundle: str | Path, state_dir: str | Path, cfg: CoordinatorConfig, evaluator: Evaluator | None = None
    ):
        super().__init__(Coordinator(bundle, state_dir, cfg, evaluator=evaluator))
        self.store, self.fingerprint, self.dim = self.core.store, self.core.fingerprint, self.core.dim

    @property
    def step(self) -> int:
        return self.core.step

    @property
    def theta(self) -> np.ndarray:
        return self.core.theta

    def close(self) -> None:
        self.core.close()
