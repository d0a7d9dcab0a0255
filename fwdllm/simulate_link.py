"""The in-process simulator's one contact with the coordinator: its public API, messages handed over in-process.

Everything else in the simulator speaks the device's transport-free ``Task`` / ``TaskResult``; the
messages the coordinator takes today are built and read here only, exactly as its gRPC servicer would
hand them over, so its accounting (bytes up and down) is the real one.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fwdllm.device_runtime.backend import Backend
from fwdllm.device_runtime.client import capabilities
from fwdllm.device_runtime.messages import submit_request, task_from_pb
from fwdllm.device_runtime.theta_sync import theta_from_chunks
from fwdllm.device_runtime.work import LocalData, Task, TaskResult
from fwdllm.proto.v1 import fwdllm_pb2 as pb


@dataclass
class Session:
    """A client's standing with the coordinator: its credentials and the θ version it holds (and θ, if downloaded)."""

    client_id: str
    session: str
    theta: np.ndarray | None = None
    theta_version: int = 0


@dataclass
class VirtualDevice(Session):
    """One simulated client: a session and its data."""

    data: LocalData = field(kw_only=True)


@dataclass
class Assignment:
    """A task the coordinator handed a device."""

    step: int
    theta_version: int
    work: Task
    message: pb.Task


class LocalCoordinator:
    """A ``Coordinator`` with its state in ``state_dir``, driven directly instead of over gRPC."""

    def __init__(self, bundle: Path, state_dir: Path, config: dict, evaluator):
        from fwdllm.coordinator.config import from_dict
        from fwdllm.coordinator.wire import InProcessCoordinator as Coordinator

        self.cfg = from_dict(config)
        self._coordinator = Coordinator(bundle, state_dir, self.cfg, evaluator=evaluator)  # evaluates θ0 as step -1
        self._token = secrets.token_urlsafe(16)
        self._coordinator.store.add_token(self._token, "in-process")

    @property
    def finished(self) -> bool:
        return bool(self._coordinator.store.get("finished"))

    @property
    def step(self) -> int:
        return self._coordinator.step

    @property
    def dim(self) -> int:
        return self._coordinator.dim

    @property
    def fingerprint(self) -> str:
        return self._coordinator.fingerprint

    def enrol(self, name: str, num_examples: int, caps: pb.Capabilities) -> Session:
        resp = self._coordinator.join(
            pb.JoinRequest(
                protocol_version=pb.PROTOCOL_VERSION_1,
                enrolment_token=self._token,
                client_name=name,
                capabilities=caps,
                model_fingerprint=self._coordinator.fingerprint,
                num_examples=num_examples,
            )
        )
        return Session(resp.client_id, resp.session_token)

    def join(self, name: str, data: LocalData, backend: Backend) -> VirtualDevice:
        session = self.enrol(name, len(data.examples), capabilities(backend))
        return VirtualDevice(session.client_id, session.session, data=data)

    def pull(self, device: Session) -> Assignment | None:
        resp = self._coordinator.pull_task(
            pb.PullTaskRequest(
                client_id=device.client_id, session_token=device.session, theta_version=device.theta_version
            )
        )
        if resp.WhichOneof("outcome") != "task":
            return None
        return Assignment(resp.task.step, resp.task.theta_version, task_from_pb(resp.task), resp.task)

    def theta_for(self, device: Session, version: int) -> np.ndarray:
        """The device's θ at ``version``, downloaded (and counted in bytes_down) when it holds another."""
        if device.theta is None or device.theta_version != version:
            chunks = list(
                self._coordinator.fetch_parameters(
                    pb.FetchParametersRequest(client_id=device.client_id, session_token=device.session, version=version)
                )
            )
            theta, got = theta_from_chunks(chunks, self._coordinator.dim)
            if theta is None:
                raise RuntimeError(f"θ version {version} arrived incomplete from the in-process coordinator")
            device.theta, device.theta_version = theta, got
        return device.theta

    def history_for(self, device: Session, version: int, max_seeds: int) -> pb.FetchHistoryResponse | None:
        """The updates from the device's θ version to ``version`` when they are replayable and cost less than θ
        (and at most ``max_seeds`` seeds of replay work), else None: the device downloads θ then. Either answer
        counts in bytes_down, as over gRPC."""
        resp = self._coordinator.fetch_history(
            pb.FetchHistoryRequest(
                client_id=device.client_id,
                session_token=device.session,
                from_version=device.theta_version,
                to_version=version,
                max_bytes=4 * self._coordinator.dim,
                max_seeds=max_seeds,
            )
        )
        versions = [u.version for u in resp.updates]
        return resp if resp.available and versions == list(range(device.theta_version + 1, version + 1)) else None

    def beat(self, device: Session) -> None:
        """A heartbeat on the device's behalf: it is alive and working on its task."""
        self._coordinator.heartbeat(pb.HeartbeatRequest(client_id=device.client_id, session_token=device.session))

    def submit(self, device: Session, task: Assignment, result: TaskResult) -> None:
        request = submit_request(task.message, result, int(result.device_seconds * 1000))
        request.client_id, request.session_token = device.client_id, device.session
        self._coordinator.submit(request, request.ByteSize())

    def tick(self) -> None:
        """Deadlines and waiting waves move on without a device call (the gRPC server's periodic tick)."""
        self._coordinator.core.tick()

    def metrics_rows(self) -> list[dict]:
        """Every metrics row, the initial evaluation (step -1) first."""
        return [json.loads(r[0]) for r in self._coordinator.store.query("SELECT row FROM metrics ORDER BY step")]

    def theta(self) -> np.ndarray:
        return self._coordinator.theta.copy()

    def config_json(self) -> dict:
        return self.cfg.to_json()

    def close(self) -> None:
        self._coordinator.close()
