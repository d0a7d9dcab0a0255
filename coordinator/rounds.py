"""The run: registry, steps and waves, tasks and seeds, result checks, variance control, updates.

Transport-free: every method takes a request message and returns a response message, or
raises ``Reject`` with the gRPC status the server answers. One lock serialises the state
machine; SQLite transactions are the commit points (see state.py).

A step perturbs theta version ``step + 1`` on the batch ``[step * batch_size, +batch_size)``
of every device. It runs in waves: a wave hands ``ceil(clients_per_step * (1 + over_select))``
tasks and closes when ``clients_per_step`` results arrived, or at its deadline with at
least ``min_results``. Variance control may then ask for another wave on the same batch;
otherwise the step's scalars (all waves) become one update and theta version ``step + 2``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
import numpy as np

from fwdllm.errors import UserError
from fwdllm.proto.manifest import load_manifest, load_theta, warm_start
from fwdllm.proto.perturbation import seed_for
from fwdllm.proto.v1 import fwdllm_pb2 as pb

from . import sampler
from .aggregation import CleanedScalars, aggregate, clean, split_half_variance
from .config import CoordinatorConfig
from .metrics import MetricsLog
from .optimizer import Optimizer
from .state import Store, now_ms, token_hash

log = logging.getLogger("fwdllm.coordinator")

Evaluator = Callable[[np.ndarray], dict]
DIST = {"gaussian": pb.GAUSSIAN, "rademacher": pb.RADEMACHER}
SCHEME = {"central": pb.CENTRAL, "forward": pb.FORWARD}
LAST_SEEN_FLUSH_MS = 5000
BEST_FILE = "best.safetensors"


class Reject(Exception):
    """A request refused with a gRPC status; ``counter`` names the rejected_* count it adds to."""

    def __init__(self, code: grpc.StatusCode, counter: str, message: str):
        super().__init__(message)
        self.code, self.counter, self.message = code, counter, message


@dataclass
class TaskRow:
    task_id: str
    step: int
    wave: int
    client_id: str
    seeds: np.ndarray
    explicit: bool
    batch_start: int
    batch_size: int
    deadline_ms: int
    status: str

    @classmethod
    def of(cls, row: tuple) -> TaskRow:
        t = cls(*row)
        t.seeds = np.frombuffer(row[4], dtype="<u8")
        t.explicit = bool(row[5])
        return t


TASK_COLUMNS = "task_id, step, wave, client_id, seeds, explicit, batch_start, batch_size, deadline_ms, status"


class TokenBucket:
    """Per-client request rate limit."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self.buckets: dict[str, tuple[float, float]] = {}
        self.lock = threading.Lock()

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        with self.lock:
            level, last = self.buckets.get(key, (self.burst, now))
            level = min(self.burst, level + (now - last) * self.rate)
            if level < 1:
                self.buckets[key] = (level, now)
                return False
            self.buckets[key] = (level - 1, now)
            return True


class Coordinator:
    def __init__(
        self, bundle: str | Path, state_dir: str | Path, cfg: CoordinatorConfig, evaluator: Evaluator | None = None
    ):
        self.cfg, self.evaluator = cfg, evaluator
        self.manifest = load_manifest(Path(bundle))
        self.layout = self.manifest.theta
        self.dim = self.layout.dim
        self.fingerprint = self.manifest.fingerprint()
        self.optimizer = Optimizer(cfg.optimizer, self.layout, cfg.run.steps)
        self.probe = self._probe_range()
        self.store = Store(Path(state_dir))
        self.metrics_log = MetricsLog(Path(state_dir))
        self.lock = threading.RLock()
        self.limiter = TokenBucket(cfg.server.rate_per_s, cfg.server.rate_burst)
        self.last_seen: dict[str, int] = {}  # counts as active only once seen by this process
        self._last_flush_ms = 0
        self.bytes_down = 0
        self._restore_or_init(Path(bundle))

    # ------------------------------------------------------------ set-up
    def _probe_range(self) -> tuple[int, int]:
        probe = self.cfg.variance.probe
        if probe == "all":
            return 0, self.dim
        for slot in self.layout.tensors:
            if slot.name == probe:
                return slot.offset, slot.offset + slot.size
        raise UserError(
            f'variance.probe {probe!r} is not a theta tensor; use "all" or one of '
            f"{[s.name for s in self.layout.tensors][:10]}"
        )

    def _restore_or_init(self, bundle: Path) -> None:
        fp = self.store.get("fingerprint")
        if fp is None:
            theta = load_theta(bundle, self.manifest)
            if self.cfg.run.init_theta:
                theta, taken = warm_start(self.layout, theta, Path(self.cfg.run.init_theta))
                log.info(
                    "θ starts from %s: %d of %d tensors taken",
                    self.cfg.run.init_theta,
                    len(taken),
                    len(self.layout.tensors),
                )
            self.store.save_checkpoint(
                1, self.layout, theta, dict(self.optimizer.state), self.cfg.server.checkpoints_keep
            )
            with self.store.transaction() as db:
                for key, value in {
                    "fingerprint": self.fingerprint,
                    "step": 0,
                    "wave": 0,
                    "wave_open": False,
                    "wave_deadline_ms": 0,
                    "next_ordinal": 0,
                    "finished": False,
                    "var0": None,
                    "wave_variances": [],
                    "step_started_ms": now_ms(),
                }.items():
                    self.store.put(db, key, value)
        elif fp != self.fingerprint:
            raise UserError(
                f"the state folder {self.store.dir} belongs to another bundle (fingerprint {fp[:12]}, "
                f"this bundle {self.fingerprint[:12]}); use a new --state folder for a new model"
            )
        self.step = int(self.store.get("step"))
        self.theta, extra = self.store.load_checkpoint(self.step + 1, self.layout)
        self.prev_grad = extra.pop("prev_grad", None)
        self.optimizer.load_state(extra)
        if self.evaluator is not None and self.cfg.eval.every > 0 and not self.store.query("SELECT 1 FROM metrics"):
            # The starting point of the curves: the bundle's theta, recorded as step -1.
            row = {
                "step": -1,
                "theta_version": 1,
                "time": datetime.now(UTC).isoformat(timespec="seconds"),
                **self.evaluator(self.theta),
            }
            with self.store.transaction() as db:
                db.execute("INSERT OR REPLACE INTO metrics VALUES (?, ?)", (-1, json.dumps(row)))
        self.metrics_log.rewrite([json.loads(r[0]) for r in self.store.query("SELECT row FROM metrics ORDER BY step")])
        log.info("coordinator at step %d (theta version %d), d=%d", self.step, self.step + 1, self.dim)

    @property
    def theta_version(self) -> int:
        return self.step + 1

    def meta(self, key: str):
        return self.store.get(key)

    # ------------------------------------------------------------ identity
    def _auth(self, client_id: str, session_token: str) -> None:
        rows = self.store.query("SELECT session_hash, active FROM clients WHERE client_id=?", (client_id,))
        if not rows:
            raise Reject(
                grpc.StatusCode.UNAUTHENTICATED,
                "rejected_unknown_client",
                f"unknown client {client_id[:64]!r}: Join first with an enrolment token",
            )
        if not rows[0][1] or rows[0][0] is None:
            raise Reject(
                grpc.StatusCode.UNAUTHENTICATED,
                "rejected_inactive_client",
                "this client left or its enrolment token was revoked: Join again",
            )
        if not secrets.compare_digest(rows[0][0], token_hash(session_token)):
            raise Reject(grpc.StatusCode.UNAUTHENTICATED, "rejected_bad_token", "wrong session token for this client")
        if not self.limiter.allow(client_id):
            raise Reject(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "rejected_rate_limited",
                f"more than {self.cfg.server.rate_per_s:g} requests/s from this client; slow down",
            )
        self.last_seen[client_id] = now_ms()

    def count(self, name: str, by: int = 1) -> None:
        with self.store.transaction() as db:
            Store.bump(db, name, by)

    def join(self, req: pb.JoinRequest) -> pb.JoinResponse:
        if req.protocol_version != pb.PROTOCOL_VERSION_1:
            raise Reject(
                grpc.StatusCode.FAILED_PRECONDITION,
                "rejected_protocol",
                f"protocol version {req.protocol_version} is not spoken here (v1); update the device",
            )
        state = self.store.token_state(req.enrolment_token)
        if state != "valid":
            raise Reject(
                grpc.StatusCode.PERMISSION_DENIED if state == "revoked" else grpc.StatusCode.UNAUTHENTICATED,
                f"rejected_token_{state}",
                f"enrolment token is {state}; ask the operator for one (`fwdllm coordinator token`)",
            )
        if req.model_fingerprint != self.fingerprint:
            raise Reject(
                grpc.StatusCode.FAILED_PRECONDITION,
                "rejected_fingerprint",
                f"model fingerprint {req.model_fingerprint[:12]!r} differs from the coordinator's "
                f"{self.fingerprint[:12]}: install the bundle this run trains",
            )
        th = token_hash(req.enrolment_token)
        session = secrets.token_urlsafe(24)
        caps = json.dumps(
            {
                "backend": req.capabilities.backend,
                "cpu_count": req.capabilities.cpu_count,
                "memory_bytes": req.capabilities.memory_bytes,
                "precision": req.capabilities.precision,
                "abi": req.capabilities.abi,
                "os": req.capabilities.os,
                "max_perturbations_per_call": req.capabilities.max_perturbations_per_call,
            }
        )
        with self.lock, self.store.transaction() as db:
            client_id = ""
            if req.previous_client_id:
                row = db.execute(
                    "SELECT token_hash FROM clients WHERE client_id=?", (req.previous_client_id,)
                ).fetchall()
                if row and row[0][0] == th:
                    client_id = req.previous_client_id
            if client_id:
                db.execute(
                    "UPDATE clients SET session_hash=?, name=?, capabilities=?, num_examples=?, last_seen_ms=?, "
                    "active=1 WHERE client_id=?",
                    (token_hash(session), req.client_name[:200], caps, int(req.num_examples), now_ms(), client_id),
                )
            else:
                client_id = uuid.uuid4().hex
                db.execute(
                    "INSERT INTO clients (client_id, session_hash, token_hash, name, capabilities, num_examples, "
                    "joined_ms, last_seen_ms) VALUES (?,?,?,?,?,?,?,?)",
                    (
                        client_id,
                        token_hash(session),
                        th,
                        req.client_name[:200],
                        caps,
                        int(req.num_examples),
                        now_ms(),
                        now_ms(),
                    ),
                )
            Store.bump(db, "joined")
        self.last_seen[client_id] = now_ms()
        return pb.JoinResponse(
            client_id=client_id,
            session_token=session,
            protocol_version=pb.PROTOCOL_VERSION_1,
            model_fingerprint=self.fingerprint,
            theta_dim=self.dim,
            theta_version=self.theta_version,
            heartbeat_interval_ms=self.cfg.server.heartbeat_ms,
        )

    def leave(self, req: pb.LeaveRequest) -> pb.LeaveResponse:
        self._auth(req.client_id, req.session_token)
        with self.lock, self.store.transaction() as db:
            db.execute("UPDATE clients SET active=0 WHERE client_id=?", (req.client_id,))
            db.execute("UPDATE tasks SET status='expired' WHERE client_id=? AND status='open'", (req.client_id,))
            Store.bump(db, "left")
        self.last_seen.pop(req.client_id, None)
        return pb.LeaveResponse()

    # ------------------------------------------------------------ tasks
    def _active_clients(self, now: int) -> list[tuple[str, int, int, str]]:
        window = int(self.cfg.server.active_window_s * 1000)
        rows = self.store.query("SELECT client_id, answered, failed, capabilities FROM clients WHERE active=1")
        return [r for r in rows if now - self.last_seen.get(r[0], 0) <= window]

    def _issue_count(self) -> int:
        return math.ceil(self.cfg.run.clients_per_step * (1 + self.cfg.run.over_select))

    def _select(self, candidates: list[tuple], k: int, wave: int) -> list[str]:
        if k >= len(candidates):
            return [c[0] for c in candidates]
        rng = np.random.default_rng([self.cfg.run.seed, self.step, wave])
        if self.cfg.run.selection == "weighted":
            # Reliability (Laplace-smoothed answered share) times sqrt(cpu count).
            weights = np.array(
                [
                    (a + 1) / (a + f + 2) * math.sqrt(max(1, json.loads(c or "{}").get("cpu_count", 1)))
                    for _, a, f, c in candidates
                ]
            )
        else:
            weights = np.ones(len(candidates))
        picked = rng.choice(len(candidates), size=k, replace=False, p=weights / weights.sum())
        return [candidates[i][0] for i in sorted(picked)]

    def _draw_seeds(self, db, k: int) -> tuple[np.ndarray, bool]:
        """k fresh seeds of this step; the sampler's whole candidate pool consumes ordinals too."""
        ordinal = int(self.store.get("next_ordinal"))
        use_sampler = self.cfg.sampler.enabled and sampler.samples_this_step(self.step) and self.prev_grad is not None
        drawn = k * self.cfg.sampler.pool_factor if use_sampler else k
        if ordinal + drawn >= 1 << 32:
            raise Reject(grpc.StatusCode.RESOURCE_EXHAUSTED, "rejected_seed_space", "this step has used all 2^32 seeds")
        seeds = np.array([seed_for(self.step, o) for o in range(ordinal, ordinal + drawn)], dtype=np.uint64)
        if use_sampler:
            seeds, _ = sampler.select(
                seeds, self.prev_grad, k, self.cfg.run.distribution, threads=self.cfg.aggregation.threads or None
            )
        self.store.put(db, "next_ordinal", ordinal + drawn)
        return seeds, use_sampler

    def _create_task(self, db, client_id: str, now: int) -> TaskRow:
        wave = int(self.store.get("wave"))
        seeds, explicit = self._draw_seeds(db, self.cfg.run.perturbations_per_client)
        task = TaskRow(
            f"t{self.step}-{wave}-{uuid.uuid4().hex[:12]}",
            self.step,
            wave,
            client_id,
            seeds,
            explicit,
            self.step * self.cfg.run.batch_size,
            self.cfg.run.batch_size,
            now + int(self.cfg.run.deadline_s * 1000),
            "open",
        )
        db.execute(
            f"INSERT INTO tasks ({TASK_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                task.task_id,
                task.step,
                task.wave,
                client_id,
                seeds.astype("<u8").tobytes(),
                int(explicit),
                task.batch_start,
                task.batch_size,
                task.deadline_ms,
                "open",
            ),
        )
        Store.bump(db, "tasks_issued")
        return task

    def task_message(self, t: TaskRow) -> pb.Task:
        task = pb.Task(
            task_id=t.task_id,
            step=t.step,
            wave=t.wave,
            theta_version=t.step + 1,
            distribution=DIST[self.cfg.run.distribution],
            epsilon=self.cfg.run.epsilon,
            scheme=SCHEME[self.cfg.run.scheme],
            batch=pb.BatchRef(start=t.batch_start, size=t.batch_size),
            deadline_unix_ms=t.deadline_ms,
        )
        if t.explicit:
            task.seeds.extend(int(s) for s in t.seeds)
        else:
            task.seed_ranges.append(pb.SeedRange(start=int(t.seeds[0]), count=len(t.seeds)))
        return task

    def _tasks(self, where: str, args=()) -> list[TaskRow]:
        return [TaskRow.of(r) for r in self.store.query(f"SELECT {TASK_COLUMNS} FROM tasks WHERE {where}", args)]

    def pull_task(self, req: pb.PullTaskRequest) -> pb.PullTaskResponse:
        self._auth(req.client_id, req.session_token)
        with self.lock:
            if self.store.get("finished"):
                return pb.PullTaskResponse(run_finished=True)
            now = now_ms()
            if not self.store.get("wave_open"):  # an open wave moves on by submits and ticks: polls stay cheap
                self._advance(now)
            if self.store.get("finished"):
                return pb.PullTaskResponse(run_finished=True)
            retry = pb.PullTaskResponse(retry_after_ms=self.cfg.server.retry_ms)
            if not self.store.get("wave_open"):
                return retry
            wave = self.store.get("wave")
            mine = self._tasks(
                "step=? AND wave=? AND client_id=? AND status IN ('open','accepted')", (self.step, wave, req.client_id)
            )
            if mine:
                if mine[0].status == "accepted":
                    return retry
                response = pb.PullTaskResponse(task=self.task_message(mine[0]))
            else:
                issued = self.store.query(
                    "SELECT COUNT(*) FROM tasks WHERE step=? AND wave=? AND status IN ('open','accepted')",
                    (self.step, wave),
                )[0][0]
                if issued >= self._issue_count():
                    return retry
                with self.store.transaction() as db:
                    task = self._create_task(db, req.client_id, now)
                response = pb.PullTaskResponse(task=self.task_message(task))
            self.bytes_down += response.ByteSize()
            return response

    # ------------------------------------------------------------ results
    def submit(self, req: pb.SubmitRequest, nbytes: int) -> pb.SubmitResponse:
        self._auth(req.client_id, req.session_token)
        with self.lock:
            now = now_ms()
            found = self._tasks("task_id=?", (req.task_id,))
            if not found:
                raise Reject(grpc.StatusCode.NOT_FOUND, "rejected_unknown_task", f"no task {req.task_id[:64]!r} exists")
            task = found[0]
            if task.client_id != req.client_id:
                raise Reject(
                    grpc.StatusCode.PERMISSION_DENIED,
                    "rejected_not_your_task",
                    "this task was handed to another client",
                )
            if req.step != task.step:
                raise Reject(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "rejected_wrong_round",
                    f"task {task.task_id} belongs to step {task.step}, the submit says step {req.step}",
                )
            if task.step != self.step:
                raise Reject(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "rejected_stale",
                    f"step {task.step} is closed (the run is at step {self.step}); pull a new task",
                )
            digest = hashlib.sha256(
                np.asarray(req.seeds, "<u8").tobytes()
                + np.asarray(req.jvp, "<f4").tobytes()
                + np.asarray(req.nonfinite, "<u4").tobytes()
            ).hexdigest()
            if task.status == "accepted":
                prior = self.store.query("SELECT digest FROM results WHERE task_id=?", (task.task_id,))[0][0]
                if prior == digest:
                    self.count("duplicate")
                    return pb.SubmitResponse(accepted=True, duplicate=True, message="already accepted; nothing changed")
                raise Reject(
                    grpc.StatusCode.ALREADY_EXISTS,
                    "rejected_duplicate",
                    "a different result for this task was already accepted",
                )
            if task.status != "open":
                raise Reject(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "rejected_cancelled",
                    f"task {task.task_id} was {task.status}: its wave no longer needs it",
                )
            if now > task.deadline_ms:
                raise Reject(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    "rejected_late",
                    f"the task's deadline passed {now - task.deadline_ms} ms ago",
                )
            seeds = np.asarray(req.seeds, dtype=np.uint64)
            if seeds.shape != task.seeds.shape or not np.array_equal(seeds, task.seeds):
                raise Reject(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "rejected_wrong_seeds",
                    f"the submit's seeds differ from the {task.seeds.size} seeds of task {task.task_id}",
                )
            jvp = np.asarray(req.jvp, dtype=np.float32)
            if jvp.size != seeds.size:
                raise Reject(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "rejected_malformed",
                    f"{jvp.size} jvp values for {seeds.size} seeds",
                )
            flagged = np.asarray(req.nonfinite, dtype=np.int64)
            if flagged.size and (
                flagged.min() < 0 or flagged.max() >= seeds.size or np.unique(flagged).size != flagged.size
            ):
                raise Reject(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "rejected_malformed",
                    "nonfinite holds indices outside the task's seeds or repeats one",
                )
            unflagged = ~np.isfinite(jvp)
            unflagged[flagged] = False
            if unflagged.any():
                raise Reject(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "rejected_nonfinite",
                    f"jvp holds {int(unflagged.sum())} NaN/Inf values not listed in nonfinite",
                )
            jvp = jvp.copy()
            jvp[flagged] = np.nan  # dropped (and counted) by aggregation
            with self.store.transaction() as db:
                db.execute(
                    "INSERT INTO results VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        task.task_id,
                        task.step,
                        task.wave,
                        task.client_id,
                        seeds.astype("<u8").tobytes(),
                        jvp.astype("<f4").tobytes(),
                        flagged.astype("<u4").tobytes(),
                        float(req.loss.mean),
                        int(req.num_examples),
                        int(nbytes),
                        now,
                        digest,
                    ),
                )
                db.execute("UPDATE tasks SET status='accepted' WHERE task_id=?", (task.task_id,))
                db.execute("UPDATE clients SET answered=answered+1 WHERE client_id=?", (task.client_id,))
                Store.bump(db, "accepted")
                if flagged.size:
                    Store.bump(db, "dropped_nonfinite", int(flagged.size))
            self._advance(now)
            return pb.SubmitResponse(accepted=True, message="accepted")

    def heartbeat(self, req: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        self._auth(req.client_id, req.session_token)
        with self.lock:
            self._advance(now_ms())
            cancelled = self.store.query(
                "SELECT task_id FROM tasks WHERE client_id=? AND step>=? AND status IN ('cancelled','expired')",
                (req.client_id, self.step - 1),
            )
        return pb.HeartbeatResponse(
            cancel_task_ids=[r[0] for r in cancelled], theta_version=self.theta_version, server_time_unix_ms=now_ms()
        )

    # ------------------------------------------------------------ waves and steps
    def tick(self) -> None:
        """Deadlines and waiting waves move on even when no device calls; the server runs this periodically.

        It also writes the registry's last-seen times, kept in memory between ticks so that a
        poll costs no write.
        """
        with self.lock:
            now = now_ms()
            if not self.store.get("finished"):
                self._advance(now)
            if now - self._last_flush_ms >= LAST_SEEN_FLUSH_MS:
                seen = [(t, c) for c, t in self.last_seen.items()]
                with self.store.transaction() as db:
                    db.executemany("UPDATE clients SET last_seen_ms=? WHERE client_id=?", seen)
                self._last_flush_ms = now

    def _advance(self, now: int) -> None:
        """Expire overdue tasks, close a finished wave, open the next one when clients are there."""
        if self.store.get("step_ready"):  # decided before a crash, not yet applied
            self._apply_step(now)
            if self.store.get("finished"):
                return
        wave = int(self.store.get("wave"))
        if self.store.get("wave_open"):
            overdue = self.store.query(
                "SELECT task_id, client_id FROM tasks WHERE step=? AND status='open' AND deadline_ms<?",
                (self.step, now),
            )
            if overdue:
                with self.store.transaction() as db:
                    for task_id, client_id in overdue:
                        db.execute("UPDATE tasks SET status='expired' WHERE task_id=?", (task_id,))
                        db.execute("UPDATE clients SET failed=failed+1 WHERE client_id=?", (client_id,))
                    Store.bump(db, "tasks_expired", len(overdue))
            accepted = self.store.query("SELECT COUNT(*) FROM results WHERE step=? AND wave=?", (self.step, wave))[0][0]
            deadline = int(self.store.get("wave_deadline_ms"))
            if accepted >= self.cfg.run.clients_per_step or (now >= deadline and accepted >= self.cfg.run.min_results):
                self._close_wave(now)
            elif now >= deadline:
                with self.store.transaction() as db:
                    self.store.put(db, "wave_deadline_ms", now + int(self.cfg.run.deadline_s * 1000))
                    Store.bump(db, "waves_extended")
        if not self.store.get("wave_open") and not self.store.get("finished"):
            self._open_wave(now)

    def _open_wave(self, now: int) -> None:
        active = self._active_clients(now)
        if len(active) < self.cfg.run.min_clients or not active:
            return
        wave = int(self.store.get("wave"))
        if wave > 0:  # the same devices again, so the extra wave sees the same batches
            answered = {
                r[0] for r in self.store.query("SELECT DISTINCT client_id FROM results WHERE step=?", (self.step,))
            }
            preferred = [c for c in active if c[0] in answered]
            active = preferred if len(preferred) >= self.cfg.run.min_results else active
        chosen = self._select(active, self._issue_count(), wave)
        with self.store.transaction() as db:
            self.store.put(db, "wave_open", True)
            self.store.put(db, "wave_deadline_ms", now + int(self.cfg.run.deadline_s * 1000))
            for client_id in chosen:
                self._create_task(db, client_id, now)

    def _step_scalars(self) -> tuple[CleanedScalars, list]:
        rows = self.store.query(
            "SELECT seeds, jvp, loss_mean, num_examples, client_id, bytes_up FROM results "
            "WHERE step=? ORDER BY task_id",
            (self.step,),
        )
        contributions = [(np.frombuffer(r[0], "<u8"), np.frombuffer(r[1], "<f4")) for r in rows]
        return clean(contributions, self.cfg.aggregation.clip or None), rows

    def _close_wave(self, now: int) -> None:
        """Decide (variance control) between another wave and the update, and commit that decision at once.

        The commit marks the step ``step_ready`` when it is to be applied, so a crash before
        the update is written resumes by applying it, never by reopening the closed wave.
        """
        wave = int(self.store.get("wave"))
        scalars, _ = self._step_scalars()
        vc = self.cfg.variance
        variance = float("nan")
        if vc.mode in ("threshold", "relative"):
            a = self.cfg.aggregation
            variance = split_half_variance(
                scalars, self.dim, self.cfg.run.distribution, *self.probe, chunk=a.chunk, threads=a.threads or None
            )
        variances = list(self.store.get("wave_variances") or []) + [variance]
        more = False
        var0 = self.store.get("var0")
        if vc.mode == "fixed":
            more = wave + 1 < vc.fixed_waves
        elif vc.mode in ("threshold", "relative") and wave + 1 < vc.max_waves:
            if vc.mode == "relative" and var0 is None:
                var0 = variance
            limit = vc.threshold if vc.mode == "threshold" else vc.relative * var0
            more = variance > limit
        with self.store.transaction() as db:
            n = db.execute("UPDATE tasks SET status='cancelled' WHERE step=? AND status='open'", (self.step,)).rowcount
            Store.bump(db, "tasks_cancelled", n)
            self.store.put(db, "wave_open", False)
            self.store.put(db, "wave_variances", variances)
            self.store.put(db, "var0", var0 if var0 is None or math.isfinite(var0) else None)
            if more:
                self.store.put(db, "wave", wave + 1)
                Store.bump(db, "extra_waves")
            else:
                self.store.put(db, "step_ready", True)
        if more:
            log.info("step %d wave %d: variance %.3g above the limit, another wave", self.step, wave, variance)
            return
        self._apply_step(now)

    def _apply_step(self, now: int) -> None:
        scalars, rows = self._step_scalars()
        variances = list(self.store.get("wave_variances") or [float("nan")])
        a, run = self.cfg.aggregation, self.cfg.run
        grad = aggregate(
            scalars, self.dim, run.distribution, method=a.method, trim=a.trim, chunk=a.chunk, threads=a.threads or None
        )
        spread = float(np.std(scalars.jvp.astype(np.float64))) if scalars.jvp.size > 1 else math.nan
        theta, info = self.optimizer.apply(self.theta, grad, self.step, jvp_std=spread)
        row = {
            "step": self.step,
            "theta_version": self.step + 2,
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "loss": _weighted_loss(rows),
            "perturbations": int(scalars.seeds.size),
            "waves": len(variances),
            "variance": variances[-1] if math.isfinite(variances[-1]) else None,
            **info,
            "bytes_up": int(sum(r[5] for r in rows)),
            "bytes_down": int(self.bytes_down),
            "step_time_s": (now - int(self.store.get("step_started_ms"))) / 1000.0,
            "clients_answered": len({r[4] for r in rows}),
            "clients_failed": self.store.query(
                "SELECT COUNT(*) FROM tasks WHERE step=? AND status='expired'", (self.step,)
            )[0][0],
            "dropped_nonfinite": scalars.dropped_nonfinite,
            "clipped": scalars.clipped,
        }
        last = self.step + 1 >= run.steps
        every = self.cfg.eval.every
        version = self.step + 2
        early = {}
        if self.evaluator is not None and every > 0 and ((self.step + 1) % every == 0 or last):
            row.update(self.evaluator(theta))
            early = self._early_stopping(row, theta, version)
            if early.get("early_stop"):
                last = True
                row["early_stopped"] = True
                if self.cfg.eval.restore_best and early["best_version"] != version:
                    theta = self.store.load_named(BEST_FILE, self.layout)
                    row["restored_version"] = early["best_version"]
        restored = "restored_version" in row
        self.store.save_checkpoint(
            version, self.layout, theta, {**self.optimizer.state, "prev_grad": grad}, self.cfg.server.checkpoints_keep
        )
        with self.store.transaction() as db:
            for key, value in early.items():
                self.store.put(db, key, value)
            if self.optimizer.replayable and a.method == "mean" and scalars.seeds.size and not restored:
                coeffs = scalars.jvp / np.float32(scalars.seeds.size) * np.float32(info["grad_scale"])
                db.execute(
                    "INSERT OR REPLACE INTO history VALUES (?,?,?,?)",
                    (version, info["lr"], scalars.seeds.astype("<u8").tobytes(), coeffs.astype("<f4").tobytes()),
                )
                db.execute("DELETE FROM history WHERE version<=?", (version - self.cfg.server.history_keep,))
            db.execute("INSERT OR REPLACE INTO metrics VALUES (?, ?)", (self.step, json.dumps(row)))
            db.execute("DELETE FROM results WHERE step=?", (self.step,))
            for key, value in {
                "step": self.step + 1,
                "wave": 0,
                "wave_open": False,
                "next_ordinal": 0,
                "finished": last,
                "wave_variances": [],
                "step_started_ms": now,
                "step_ready": False,
            }.items():
                self.store.put(db, key, value)
            Store.bump(db, "steps")
        self.theta, self.prev_grad, self.step, self.bytes_down = theta, grad, self.step + 1, 0
        self.metrics_log.append(row)
        log.info(
            "step %d applied: %d perturbations, loss %s, lr %.3g",
            row["step"],
            row["perturbations"],
            row["loss"],
            row["lr"],
        )

    def _early_stopping(self, row: dict, theta: np.ndarray, version: int) -> dict:
        """Track the best held-out loss; the meta updates to commit, with early_stop when patience ran out.

        A forward-gradient run can collapse late (calibration-bbc.md: BitFit 91.5% -> 31%), so
        the run may stop when ``eval.patience`` evaluations in a row did not improve the
        held-out loss, and (``restore_best``) end on the best theta seen.
        """
        patience, loss = self.cfg.eval.patience, row.get("eval_loss")
        if patience <= 0 or loss is None or not math.isfinite(loss):
            return {}
        best = self.store.get("best_eval_loss")
        if best is None or loss < best:
            self.store.save_named(BEST_FILE, self.layout, theta)
            return {"best_eval_loss": loss, "best_version": version, "evals_since_best": 0}
        since = int(self.store.get("evals_since_best", 0)) + 1
        return {
            "evals_since_best": since,
            "best_version": self.store.get("best_version"),
            "early_stop": since >= patience,
        }

    # ------------------------------------------------------------ model distribution
    def theta_at(self, version: int) -> tuple[int, np.ndarray]:
        with self.lock:
            current = self.theta_version
            if version in (0, current):
                return current, self.theta
        if version > current or not self.store.checkpoint_path(version).is_file():
            raise Reject(
                grpc.StatusCode.NOT_FOUND,
                "rejected_unknown_version",
                f"theta version {version} is not kept (current {current}); ask for 0, the latest",
            )
        return version, self.store.load_checkpoint(version, self.layout)[0]

    def fetch_parameters(self, req: pb.FetchParametersRequest):
        self._auth(req.client_id, req.session_token)
        version, theta = self.theta_at(int(req.version))
        chunk = int(req.chunk_values) or self.cfg.server.fetch_chunk_values
        chunk = max(1, min(chunk, self.cfg.server.max_message_bytes // 4 - 64))
        data = theta.astype("<f4").tobytes()
        digest = hashlib.sha256(data).hexdigest()
        for offset in range(0, self.dim, chunk):
            last = offset + chunk >= self.dim
            msg = pb.ParameterChunk(
                version=version,
                offset=offset,
                total=self.dim,
                values=data[4 * offset : 4 * min(self.dim, offset + chunk)],
                sha256=digest if last else "",
            )
            self._count_down(msg.ByteSize())
            yield msg

    def fetch_history(self, req: pb.FetchHistoryRequest) -> pb.FetchHistoryResponse:
        """The updates after ``from_version`` for replay, or a refusal that sends the device to FetchParameters.

        Every answer counts in ``bytes_down``: a device that asks with ``max_bytes`` = θ's size gets
        either history smaller than θ or a few bytes of refusal, never history it then discards.
        """
        self._auth(req.client_id, req.session_token)
        response = self._history(req)
        self._count_down(response.ByteSize())
        return response

    def _history(self, req: pb.FetchHistoryRequest) -> pb.FetchHistoryResponse:
        """The caps are checked before the answer is built: the stored seed count bounds the replay work
        and, at 4 bytes per coefficient, the answer's size from below, so an over-long history is refused
        without reading it; one that passes is at most ``max_bytes / 4`` seeds, built and measured exactly."""

        def refuse(why: int) -> pb.FetchHistoryResponse:
            return pb.FetchHistoryResponse(available=False, theta_dim=self.dim, refusal=why)

        if not self.optimizer.replayable or self.cfg.aggregation.method != "mean":
            return refuse(pb.HISTORY_NOT_REPLAYABLE)
        to_version = int(req.to_version) or self.theta_version
        start = int(req.from_version)
        if not 1 <= start <= to_version <= self.theta_version:
            return refuse(pb.HISTORY_NOT_KEPT)
        window, wanted = (start, to_version), list(range(start + 1, to_version + 1))
        sizes = self.store.query(
            "SELECT version, LENGTH(seeds) / 8 FROM history WHERE version>? AND version<=? ORDER BY version", window
        )
        if [r[0] for r in sizes] != wanted:
            return refuse(pb.HISTORY_NOT_KEPT)
        seeds = sum(r[1] for r in sizes)
        if (req.max_seeds and seeds > req.max_seeds) or (req.max_bytes and 4 * seeds > req.max_bytes):
            return refuse(pb.HISTORY_OVER_CAP)
        rows = self.store.query(
            "SELECT version, lr, seeds, coefficients FROM history WHERE version>? AND version<=? ORDER BY version",
            window,
        )
        if [r[0] for r in rows] != wanted:  # a step pruned the oldest record between the two reads
            return refuse(pb.HISTORY_NOT_KEPT)
        dist = DIST[self.cfg.run.distribution]
        response = pb.FetchHistoryResponse(
            available=True,
            theta_dim=self.dim,
            updates=[
                pb.UpdateRecord(
                    version=v,
                    lr=lr,
                    seeds=np.frombuffer(s, "<u8").tolist(),
                    coefficients=np.frombuffer(c, "<f4").tolist(),
                    distribution=dist,
                )
                for v, lr, s, c in rows
            ],
        )
        if req.max_bytes and response.ByteSize() > req.max_bytes:
            return refuse(pb.HISTORY_OVER_CAP)
        return response

    def _count_down(self, nbytes: int) -> None:
        """Add to this step's ``bytes_down``; under the lock, as downloads are served on many threads."""
        with self.lock:
            self.bytes_down += nbytes

    # ------------------------------------------------------------ operators
    def status(self) -> pb.StatusResponse:
        with self.lock:
            window = int(self.cfg.server.active_window_s * 1000)
            now = now_ms()
            registered = self.store.query("SELECT COUNT(*) FROM clients")[0][0]
            last = self.store.query("SELECT row FROM metrics ORDER BY step DESC LIMIT 1")
            metrics = {
                k: float(v)
                for k, v in (json.loads(last[0][0]).items() if last else [])
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            return pb.StatusResponse(
                model_fingerprint=self.fingerprint,
                step=self.step,
                theta_version=self.theta_version,
                clients_registered=registered,
                clients_active=sum(1 for t in self.last_seen.values() if now - t <= window),
                counters=self.store.counters(),
                metrics=metrics,
                finished=bool(self.store.get("finished")),
            )

    def close(self) -> None:
        self.store.close()


def _weighted_loss(rows: list) -> float | None:
    pairs = [(r[2], max(1, r[3])) for r in rows if r[2] is not None and math.isfinite(r[2])]
    if not pairs:
        return None
    return float(sum(loss * n for loss, n in pairs) / sum(n for _, n in pairs))
