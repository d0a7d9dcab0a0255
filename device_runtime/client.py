"""The device client: join a coordinator, pull tasks, compute forward gradients, submit them.

It survives coordinator restarts and network drops: every call is retried with exponential
backoff and jitter, a lost session is re-joined under the same client id, and results
that were not acknowledged are kept (in memory, and in ``state_file`` when given) and
resubmitted. The coordinator deduplicates by task_id, and a result is dropped from the
queue only once the coordinator has accepted it, called it a duplicate, or refused it for
good, so no result is ever accepted twice. One log line per task. θ is kept current by
``ThetaSync`` (theta_sync.py): history replay when that is smaller than θ, else a download.
Retries live in connection.py, the state file in client_state.py, the task's work in work.py.
"""

from __future__ import annotations

import logging
import os
import platform
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from fwdllm import __version__
from fwdllm.device_runtime.backend import DEFAULT_BACKEND, Backend, open_backend
from fwdllm.device_runtime.client_state import load_state, save_state
from fwdllm.device_runtime.connection import TRANSIENT, ClientError, RetryingCalls, open_channel
from fwdllm.device_runtime.engine import Cancelled
from fwdllm.device_runtime.examples import load_examples
from fwdllm.device_runtime.messages import submit_request, task_from_pb
from fwdllm.device_runtime.theta_sync import ThetaSync
from fwdllm.device_runtime.work import LocalData, do_task
from fwdllm.errors import UserError
from fwdllm.proto.manifest import load_manifest
from fwdllm.proto.v1 import fwdllm_pb2 as pb
from fwdllm.proto.v1 import fwdllm_pb2_grpc as pb_grpc

log = logging.getLogger("fwdllm.device")


@dataclass
class ClientConfig:
    coordinator: str
    bundle: Path
    data: Path
    backend: str = DEFAULT_BACKEND
    precision: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    token: str = ""
    tls_ca: Path | None = None
    tls_cert: Path | None = None  # this device's certificate and key, for a coordinator that requires one
    tls_key: Path | None = None
    name: str = ""
    state_file: Path | None = None
    max_seeds: int = 4096  # the most seeds one task may ask for
    replay_max_seeds: int = 4096  # replay history (when smaller than θ) only if it holds at most this many seeds
    rpc_timeout_s: float = 30.0
    backoff_s: tuple[float, float] = (0.5, 30.0)  # first and largest wait between retries


def capabilities(backend: Backend) -> pb.Capabilities:
    info = backend.info()
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 0
    return pb.Capabilities(
        backend=backend.name,
        delegates=list(info.get("providers") or info.get("delegates") or []),
        precision=backend.graph.precision,
        memory_bytes=memory,
        abi=platform.machine(),
        os=f"{platform.system()} {platform.release()}",
        cpu_count=os.cpu_count() or 1,
        max_perturbations_per_call=backend.max_perturbations or 0,
        versions={"fwdllm": __version__, backend.name: str(info.get("version", ""))},
    )


class DeviceClient(ThetaSync, RetryingCalls):
    def __init__(self, cfg: ClientConfig, backend: Backend | None = None):
        self.cfg = cfg
        # a given backend (one shared by a simulation worker's clients) brings the manifest it was opened with:
        # loading checks every file's hash, a fifth of a second per client for a small bundle
        self.manifest = backend.manifest if backend is not None else load_manifest(cfg.bundle)
        self.fingerprint = self.manifest.fingerprint()
        self.backend = backend or open_backend(cfg.bundle, cfg.backend, cfg.precision, cfg.options, self.manifest)
        self.data = LocalData(load_examples(cfg.data, self.manifest), self.backend.tokenizer())
        self.client_id, self.session = "", ""
        self.client_secret = ""  # proves client_id when rejoining
        self.heartbeat_s = 5.0
        self.pull_wait_ms = 0  # how long the coordinator holds a pull that finds no task (Join says)
        self._pull_held = False  # a held pull is in flight: it shows this device alive, so no beats meanwhile
        self.pending: dict[str, pb.SubmitRequest] = {}
        self.settled: set[str] = set()  # task ids the coordinator has answered for good
        self.cancelled: set[str] = set()
        self.current_task = ""
        self.stats = {
            "tasks": 0,
            "accepted": 0,
            "duplicate": 0,
            "rejected": 0,
            "failed": 0,
            "cancelled": 0,
            "retries": 0,
            "rejoins": 0,
            "theta_fetches": 0,
            "theta_replays": 0,
        }
        self._stop = threading.Event()
        self._leave_on_stop = True
        self._lock = threading.Lock()
        if cfg.state_file:
            self.client_id, self.client_secret, self.pending = load_state(cfg.state_file, self.fingerprint)
        self.channel = open_channel(cfg.coordinator, cfg.tls_ca, cfg.backoff_s, cfg.tls_cert, cfg.tls_key)
        self.stub = pb_grpc.FwdLLMStub(self.channel)

    def join(self) -> pb.JoinResponse:
        def request():
            return pb.JoinRequest(
                protocol_version=pb.PROTOCOL_VERSION_1,
                enrolment_token=self.cfg.token,
                client_name=self.cfg.name or platform.node(),
                capabilities=capabilities(self.backend),
                model_fingerprint=self.fingerprint,
                num_examples=len(self.data.examples),
                previous_client_id=self.client_id,
                client_secret=self.client_secret,
            )

        try:
            resp = self._call("Join", request)
        except grpc.RpcError as exc:
            raise ClientError(
                f"the coordinator refused to let this device join ({exc.code().name}): {exc.details()}"
            ) from exc
        if resp.model_fingerprint and resp.model_fingerprint != self.fingerprint:
            raise ClientError(
                f"bundle {self.cfg.bundle} (fingerprint {self.fingerprint[:12]}) is not the model this "
                f"coordinator trains ({resp.model_fingerprint[:12]}); install the run's bundle"
            )
        if resp.theta_dim and resp.theta_dim != self.manifest.theta.dim:
            raise ClientError(
                f"the coordinator's θ has {resp.theta_dim} values, this bundle's {self.manifest.theta.dim}"
            )
        if resp.client_id != self.client_id or resp.client_secret:  # a rejoin keeps the secret it proved
            self.client_secret = resp.client_secret
        self.client_id, self.session = resp.client_id, resp.session_token
        self.history_replayable = True  # a restarted coordinator may run another optimiser
        self.heartbeat_s = max(0.05, (resp.heartbeat_interval_ms or 5000) / 1000)
        self.pull_wait_ms = resp.pull_wait_ms
        self._save_state()
        log.info(
            "joined %s as %s (θ version %d, heartbeat %.1f s)",
            self.cfg.coordinator,
            self.client_id,
            resp.theta_version,
            self.heartbeat_s,
        )
        return resp

    # ------------------------------------------------------------ the loop
    def run(self, max_tasks: int | None = None) -> int:
        """Serve tasks until the run finishes (or ``max_tasks`` were handled); returns an exit code."""
        try:
            return self._serve(max_tasks)
        except grpc.RpcError as exc:
            raise ClientError(f"the coordinator refused this device ({exc.code().name}): {exc.details()}") from None

    def _serve(self, max_tasks: int | None) -> int:
        if not self.session:  # a simulation worker joins its clients first, in order
            self.join()
        beat = threading.Thread(target=self._heartbeats, name="fwdllm-heartbeat", daemon=True)
        beat.start()
        handled = 0
        try:
            while not self._stop.is_set() and (max_tasks is None or handled < max_tasks):
                self._submit_pending()
                self._pull_held = self.pull_wait_ms > 0
                try:
                    resp = self._call(
                        "PullTask",
                        lambda: pb.PullTaskRequest(
                            client_id=self.client_id,
                            session_token=self.session,
                            theta_version=self.theta_version,
                            wait_ms=self.pull_wait_ms,
                        ),
                        hold_s=self.pull_wait_ms / 1000,
                    )
                finally:
                    self._pull_held = False
                outcome = resp.WhichOneof("outcome")
                if outcome == "run_finished":
                    log.info("the run is finished; leaving")
                    self._leave("run finished")
                    return 0
                if outcome == "task":
                    self._handle(resp.task)
                    handled += 1
                else:
                    self._stop.wait(max(resp.retry_after_ms, 50) / 1000)
            stopped = self._stop.is_set()
            self._submit_pending()
            if stopped and self._leave_on_stop:  # say so: the coordinator reassigns at once instead of timing out
                self._leave("stopped")
            return 0
        finally:
            self._stop.set()
            beat.join(timeout=2)

    def stop(self, leave: bool = True) -> None:
        """Finish serving: the task in hand is abandoned, computed results are submitted, then Leave.

        ``leave=False`` pauses instead (a simulation stopped for ``--resume``): the coordinator keeps
        this device's tasks for it, so the resumed run computes exactly what an uninterrupted one would.
        """
        self._leave_on_stop = leave
        self._stop.set()

    def _leave(self, reason: str) -> None:
        try:
            self.stub.Leave(
                pb.LeaveRequest(client_id=self.client_id, session_token=self.session, reason=reason),
                timeout=self.cfg.rpc_timeout_s,
            )
        except grpc.RpcError as exc:
            log.info("leave failed (%s); the coordinator will time this device out", exc.code().name)

    def _heartbeats(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if self._pull_held:
                continue
            try:
                resp = self.stub.Heartbeat(
                    pb.HeartbeatRequest(
                        client_id=self.client_id, session_token=self.session, task_id=self.current_task
                    ),
                    timeout=self.heartbeat_s * 2,
                )
            except grpc.RpcError as exc:  # the main loop handles reconnection; a missed beat is harmless
                log.debug("heartbeat failed: %s", exc.code().name)
                continue
            with self._lock:
                self.cancelled.update(resp.cancel_task_ids)

    # ------------------------------------------------------------ one task
    def _handle(self, task: pb.Task) -> None:
        self.stats["tasks"] += 1
        tid = task.task_id
        head = f"task {tid[:12]} step {task.step} wave {task.wave}"
        if tid in self.settled or tid in self.pending:
            self._submit_pending()
            log.info("%s: already computed; result resubmitted", head)
            return
        deadline_s = task.deadline_unix_ms / 1000 if task.deadline_unix_ms else None

        def should_stop() -> bool:
            with self._lock:
                gone = tid in self.cancelled
            return gone or self._stop.is_set() or (deadline_s is not None and time.time() > deadline_s)

        started = time.perf_counter()
        self.current_task = tid
        try:
            if should_stop():
                raise Cancelled()
            work = task_from_pb(task)
            theta = self._theta_at(task.theta_version)
            result = do_task(
                work, self.backend, self.data, theta, max_seeds=self.cfg.max_seeds, should_stop=should_stop
            )
        except Cancelled:
            self.stats["cancelled"] += 1
            why = "cancelled by the coordinator" if tid in self.cancelled else "deadline passed"
            log.info("%s: %s; not submitted", head, why)
            return
        except (UserError, grpc.RpcError) as exc:  # this task cannot be computed; the device keeps serving
            self.stats["failed"] += 1
            detail = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else str(exc)
            log.warning("%s: failed: %s", head, detail)
            return
        finally:
            self.current_task = ""
        elapsed_ms = int((time.perf_counter() - started) * 1000)  # θ's download or replay included
        request = submit_request(task, result, elapsed_ms)
        self.pending[tid] = request
        self._save_state()
        outcome = self._submit_pending().get(tid, "kept for resubmission")
        log.info(
            "%s: %d seeds, %d non-finite, loss %.4f, %d ms, %d calls -> %s",
            head,
            len(result.seeds),
            len(result.nonfinite),
            result.loss_mean,
            elapsed_ms,
            result.calls,
            outcome,
        )

    def _submit_pending(self) -> dict[str, str]:
        """Send every unacknowledged result; returns task id -> outcome for those settled now."""
        outcomes = {}
        final = frozenset(c for c in grpc.StatusCode if c not in TRANSIENT and c != grpc.StatusCode.UNAUTHENTICATED)
        for tid, request in list(self.pending.items()):

            def make(request=request):
                request.client_id, request.session_token = self.client_id, self.session
                return request

            try:
                resp = self._call("Submit", make, final=final)
                outcome = (
                    "duplicate (already accepted)"
                    if resp.duplicate
                    else ("accepted" if resp.accepted else f"refused: {resp.message}")
                )
                self.stats["duplicate" if resp.duplicate else "accepted" if resp.accepted else "rejected"] += 1
            except grpc.RpcError as exc:
                if exc.code() not in final:
                    raise
                outcome = f"rejected ({exc.code().name}: {exc.details()})"
                self.stats["rejected"] += 1
            outcomes[tid] = outcome
            self.settled.add(tid)
            del self.pending[tid]
            self._save_state()
        return outcomes

    def _save_state(self) -> None:
        if self.cfg.state_file:
            save_state(self.cfg.state_file, self.fingerprint, self.client_id, self.client_secret, self.pending)
