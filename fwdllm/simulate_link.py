"""The in-process simulator's one contact with the coordinator: its public API, messages handed over in-process.

Everything else in the simulator speaks the device's transport-free ``Task`` / ``TaskResult``; the
messages the coordinator takes today are built and read here only, exactly as its gRPC servicer would
hand them over, so its accounting (bytes up and down) is the real one.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fwdllm.device_runtime.backend import Backend
from fwdllm.device_runtime.client import capabilities
from fwdllm.device_runtime.messages import submit_request, task_from_pb
from fwdllm.device_runtime.theta_sync import theta_from_chunks
from fwdllm.device_runtime.work import LocalData, Task, TaskResult
from fwdllm.proto.v1 import fwdllm_pb2 as pb


@dataclass
class VirtualDevice:
    """One simulated client: its session, its data and the θ it last downloaded."""

    client_id: str
    session: str
    data: LocalData
    theta: np.ndarray | None = None
    theta_version: int = 0


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

    def join(self, name: str, data: LocalData, backend: Backend) -> VirtualDevice:
        resp = self._coordinator.join(
            pb.JoinRequest(
                protocol_version=pb.PROTOCOL_VERSION_1,
                enrolment_token=self._token,
                client_name=name,
                capabilities=capabilities(backend),
                model_fingerprint=self._coordinator.fingerprint,
                num_examples=len(data.examples),
            )
        )
        return VirtualDevice(resp.client_id, resp.session_token, data)

    def pull(self, device: VirtualDevice) -> Assignment | None:
        resp = self._coordinator.pull_task(
            pb.PullTaskRequest(
                client_id=device.client_id, session_token=device.session, theta_version=device.theta_version
            )
        )
        if resp.WhichOneof("outcome") != "task":
            return None
        return Assignment(resp.task.step, resp.task.theta_version, task_from_pb(resp.task), resp.task)

    def theta_for(self, device: VirtualDevice, version: int) -> np.ndarray:
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

    def submit(self, device: VirtualDevice, task: Assignment, result: TaskResult) -> None:
        request = submit_request(task.message, result, int(result.device_seconds * 1000))
        request.client_id, request.session_token = device.client_id, device.session
        self._coordinator.submit(request, request.ByteSize())

    def metrics_rows(self) -> list[dict]:
        """Every metrics row, the initial evaluation (step -1) first."""
        return [json.loads(r[0]) for r in self._coordinator.store.query("SELECT row FROM metrics ORDER BY step")]

    def theta(self) -> np.ndarray:
        return self._coordinator.theta.copy()

    def config_json(self) -> dict:
        return self.cfg.to_json()

    def close(self) -> None:
        self._coordinator.close()
