"""The coordinator core: a transport-free step machine driven with the plain objects of messages.py.

select → hand out → collect → another wave or the update → evaluate → checkpoint: the jobs live in
registry.py, handout.py, results.py, waves.py, updates.py and serving.py; this class wires them,
authenticates every request and serialises the state machine under one lock. Requests move the
machine on (submits, and pulls while no wave is open) and so does ``tick``, which the server runs
periodically so that deadlines pass even when no device calls. SQLite transactions are the
commit points (state.py).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from fwdllm.coordinator import results
from fwdllm.coordinator.config import CoordinatorConfig
from fwdllm.coordinator.handout import Handout
from fwdllm.coordinator.messages import (
    Beat,
    Credentials,
    History,
    HistoryQuery,
    Joined,
    JoinRequest,
    Pulled,
    Receipt,
    Status,
    Submission,
)
from fwdllm.coordinator.metrics import MetricsLog
from fwdllm.coordinator.optimizer import Optimizer
from fwdllm.coordinator.records import RunState
from fwdllm.coordinator.registry import Registry
from fwdllm.coordinator.serving import ThetaServing
from fwdllm.coordinator.state import Store, now_ms
from fwdllm.coordinator.updates import Evaluator, Updates
from fwdllm.coordinator.waves import Waves
from fwdllm.errors import UserError
from fwdllm.proto.manifest import load_manifest, load_theta, warm_start

log = logging.getLogger("fwdllm.coordinator")

LAST_SEEN_FLUSH_MS = 5000


class Coordinator:
    """One run, resumed from its state folder: every method takes and returns the objects of messages.py
    and refuses with ``Reject(Reason)``, so gRPC (server.py), the in-process simulator and tests drive it alike."""

    def __init__(
        self, bundle: str | Path, state_dir: str | Path, cfg: CoordinatorConfig, evaluator: Evaluator | None = None
    ):
        self.cfg = cfg
        self.manifest = load_manifest(Path(bundle))
        self.layout = self.manifest.theta
        self.dim = self.layout.dim
        self.fingerprint = self.manifest.fingerprint()
        self.optimizer = Optimizer(cfg.optimizer, self.layout, cfg.run.steps)
        self.store = Store(Path(state_dir))
        self.lock = threading.RLock()
        self._start_or_resume(Path(bundle))
        self.registry = Registry(self.store, cfg, self.fingerprint)
        self.handout = Handout(self.store, cfg)
        self.updates = Updates(self.store, cfg, self.layout, self.optimizer, MetricsLog(Path(state_dir)), evaluator)
        self.waves = Waves(self.store, cfg, self.layout, self.registry, self.handout, self.updates)
        self.serving = ThetaServing(self.store, cfg, self.updates)
        self.updates.record_start()
        self._last_flush_ms = 0
        log.info("coordinator at step %d (theta version %d), d=%d", self.step, self.theta_version, self.dim)

    def _start_or_resume(self, bundle: Path) -> None:
        """A fresh state folder gets θ version 1 and the run state; one of another bundle is refused."""
        run = self.store.saved_run
        if run is not None and run.fingerprint != self.fingerprint:
            raise UserError(
                f"the state folder {self.store.dir} belongs to another bundle (fingerprint {run.fingerprint[:12]}, "
                f"this bundle {self.fingerprint[:12]}); use a new --state folder for a new model"
            )
        if run is not None:
            return
        theta = load_theta(bundle, self.manifest)
        if self.cfg.run.init_theta:
            theta, taken = warm_start(self.layout, theta, Path(self.cfg.run.init_theta))
            log.info(
                "θ starts from %s: %d of %d tensors taken",
                self.cfg.run.init_theta,
                len(taken),
                len(self.layout.tensors),
            )
        extra = dict(self.optimizer.state)
        self.store.save_checkpoint(1, self.layout, theta, extra, self.cfg.server.checkpoints_keep)
        with self.store.transaction():
            self.store.save_run(RunState(fingerprint=self.fingerprint, step_started_ms=now_ms()))

    # ------------------------------------------------------------ where the run stands
    @property
    def run(self) -> RunState:
        return self.store.run

    @property
    def step(self) -> int:
        return self.store.run.step

    @property
    def theta_version(self) -> int:
        return self.store.run.theta_version

    @property
    def theta(self) -> np.ndarray:
        return self.updates.theta

    @property
    def bytes_down(self) -> int:
        return self.updates.bytes_down

    @property
    def limiter(self):
        return self.registry.limiter

    def work_key(self) -> tuple:
        """Changes whenever a device without a task may now get one: a wave opened or closed, a slot freed,
        the run ended. Read without the lock: a transport that holds pulls compares it after each call."""
        run = self.store.run
        return (run.step, run.wave, run.wave_open, run.finished, self.waves.slots_freed)

    def meta(self, field: str):
        """One run-state field by name (``run`` has them all, typed); an unknown name raises AttributeError."""
        return getattr(self.store.run, field)

    # ------------------------------------------------------------ devices
    def join(self, req: JoinRequest) -> Joined:
        with self.lock:
            return self.registry.join(req, self.theta_version, self.dim)

    def leave(self, who: Credentials) -> None:
        self.registry.authenticate(who)
        with self.lock:
            self.registry.leave(who)

    def pull(self, who: Credentials) -> Pulled:
        self.registry.authenticate(who)
        with self.lock:
            self.registry.asks_for_work(who.client_id)
            if not self.store.run.wave_open and not self.store.run.finished:
                self.waves.advance(now_ms())  # an open wave moves on by submits and ticks: polls stay cheap
            run = self.store.run
            if run.finished:
                return Pulled(run_finished=True)
            if not run.wave_open:
                return Pulled(retry_after_ms=self.cfg.server.retry_ms)
            return self.handout.pull(who.client_id, self.updates.prev_grad, now_ms())

    def submit(self, sub: Submission) -> Receipt:
        self.registry.authenticate(sub.who)
        with self.lock:
            now = now_ms()
            receipt = results.receive(self.store, sub, self.step, now)
            if not receipt.duplicate:
                self.waves.advance(now)
            return receipt

    def heartbeat(self, who: Credentials) -> Beat:
        self.registry.authenticate(who)
        with self.lock:
            self.waves.advance(now_ms())
            cancelled = self.store.tasks.dropped_ids(who.client_id, self.step - 1)
        return Beat(cancel_task_ids=cancelled, theta_version=self.theta_version, server_time_ms=now_ms())

    def fetch_parameters(self, who: Credentials, version: int) -> tuple[int, np.ndarray]:
        """θ of ``version`` (0: the current one) and its version number."""
        self.registry.authenticate(who)
        return self.theta_at(version)

    def theta_at(self, version: int) -> tuple[int, np.ndarray]:
        with self.lock:
            current = self.theta_version
            if version in (0, current):
                return current, self.theta
        return version, self.serving.checkpoint(version, current)

    def fetch_history(self, query: HistoryQuery) -> History:
        self.registry.authenticate(query.who)
        return self.serving.history(query, self.theta_version)

    def count_down(self, nbytes: int) -> None:
        """Add what a device downloaded to this step's ``bytes_down``."""
        with self.lock:
            self.updates.bytes_down += nbytes

    # ------------------------------------------------------------ operators
    def count(self, name: str, by: int = 1) -> None:
        with self.store.transaction():
            self.store.bump(name, by)

    def tick(self) -> None:
        """Move deadlines and waiting waves on without device calls; write the registry's last-seen times."""
        with self.lock:
            now = now_ms()
            if not self.store.run.finished:
                self.waves.advance(now)
            if now - self._last_flush_ms >= LAST_SEEN_FLUSH_MS:
                self.registry.flush_last_seen()
                self._last_flush_ms = now

    def status(self) -> Status:
        with self.lock:
            last = self.store.last_metrics() or {}
            return Status(
                model_fingerprint=self.fingerprint,
                step=self.step,
                theta_version=self.theta_version,
                clients_registered=self.store.count_clients(),
                clients_active=self.registry.count_active(now_ms()),
                counters=self.store.counters(),
                metrics={
                    k: float(v) for k, v in last.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                },
                finished=self.store.run.finished,
            )

    def close(self) -> None:
        self.store.close()
