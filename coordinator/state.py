"""Durable coordinator state: SQLite (WAL) for everything small, safetensors checkpoints for theta.

Every SQL statement of the coordinator lives here, and rows leave only as the typed records of
records.py. The commit points are SQLite transactions: a task (and the seed ordinals it
consumed) is committed before a device sees it, a result before the device hears "accepted",
and a step is applied by writing the next checkpoint file first and then advancing the step
counter in one transaction. A SIGKILL between the two leaves the old step open with all its
results, so the restart recomputes the same update bit for bit and overwrites the file. WAL
with synchronous=NORMAL survives any process crash (only an OS crash could lose the last commit).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from fwdllm.coordinator.checkpoints import read_theta, write_theta
from fwdllm.coordinator.records import Candidate, ClientAuth, HistoryRecord, RunState
from fwdllm.coordinator.store_tables import Results, Tasks
from fwdllm.errors import UserError
from fwdllm.proto.manifest import ThetaLayout

DB_FILE = "coordinator.sqlite"
CHECKPOINT_DIR = "checkpoints"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (hash TEXT PRIMARY KEY, label TEXT, created_ms INTEGER, revoked INTEGER DEFAULT 0);
CREATE TABLE IF NOT EXISTS clients (
  client_id TEXT PRIMARY KEY, session_hash TEXT, token_hash TEXT, name TEXT, capabilities TEXT,
  num_examples INTEGER, joined_ms INTEGER, last_seen_ms INTEGER, answered INTEGER DEFAULT 0,
  failed INTEGER DEFAULT 0, active INTEGER DEFAULT 1, secret_hash TEXT);
CREATE TABLE IF NOT EXISTS tasks (
  task_id TEXT PRIMARY KEY, step INTEGER, wave INTEGER, client_id TEXT, seeds BLOB, explicit INTEGER,
  batch_start INTEGER, batch_size INTEGER, deadline_ms INTEGER, status TEXT, digest TEXT);
CREATE INDEX IF NOT EXISTS tasks_step ON tasks (step, wave, status);
CREATE INDEX IF NOT EXISTS tasks_client ON tasks (client_id, step);
CREATE TABLE IF NOT EXISTS results (
  task_id TEXT PRIMARY KEY, step INTEGER, wave INTEGER, client_id TEXT, seeds BLOB, jvp BLOB,
  nonfinite BLOB, loss_mean REAL, num_examples INTEGER, bytes_up INTEGER, received_ms INTEGER, digest TEXT);
CREATE INDEX IF NOT EXISTS results_step ON results (step);
CREATE TABLE IF NOT EXISTS history (version INTEGER PRIMARY KEY, lr REAL, seeds BLOB, coefficients BLOB);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS metrics (step INTEGER PRIMARY KEY, row TEXT NOT NULL);
"""


def now_ms() -> int:
    return int(time.time() * 1000)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Store:
    """One SQLite connection shared under a lock. Writes go through ``transaction``; the run state is
    read from memory and becomes visible to other threads when the transaction that saved it commits."""

    def __init__(self, state_dir: Path):
        self.dir = Path(state_dir)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / CHECKPOINT_DIR).mkdir(exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the state folder {self.dir} ({exc}); pick a writable --state") from exc
        self.lock = threading.RLock()
        self.db = sqlite3.connect(self.dir / DB_FILE, isolation_level=None, check_same_thread=False, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self._add_missing_columns()
        self._committed = self._load_run()
        self._pending: RunState | None = None
        self.tasks, self.results = Tasks(self), Results(self)

    def _add_missing_columns(self) -> None:
        """A state folder from before per-client secrets gets the column; its clients have none, so
        their next Join with an old id gets a new one. Likewise the digest of an accepted task's result."""
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(clients)")}
        if "secret_hash" not in columns:
            self.db.execute("ALTER TABLE clients ADD COLUMN secret_hash TEXT")
        if "digest" not in {row[1] for row in self.db.execute("PRAGMA table_info(tasks)")}:
            self.db.execute("ALTER TABLE tasks ADD COLUMN digest TEXT")

    @contextmanager
    def transaction(self):
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            self._pending = None
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                self._pending = None
                raise
            self.db.execute("COMMIT")
            self._committed = self._pending or self._committed
            self._pending = None

    def write(self, sql: str, args=()) -> sqlite3.Cursor:
        if not self.db.in_transaction:
            raise RuntimeError("a store write outside a transaction would commit on its own")
        return self.db.execute(sql, args)

    def read(self, sql: str, args=()) -> list[tuple]:
        with self.lock:
            return self.db.execute(sql, args).fetchall()

    def query(self, sql: str, args=()) -> list[tuple]:
        """Read-only SQL for operators and tests inspecting a state folder."""
        return self.read(sql, args)

    # ----- run state -----
    def _load_run(self) -> RunState | None:
        stored = {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM meta")}
        if "fingerprint" not in stored:
            return None
        values = {k: v for k, v in stored.items() if k in RunState.field_names()}
        values["wave_variances"] = tuple(values.get("wave_variances") or ())
        return RunState(**values)

    @property
    def saved_run(self) -> RunState | None:
        """The run state, None in a folder no run has started in: the saving thread sees its
        transaction's, others the last committed one."""
        with self.lock:
            return self._pending or self._committed

    @property
    def run(self) -> RunState:
        """The run state of a started run (``saved_run`` where there may be none yet)."""
        run = self.saved_run
        if run is None:
            raise RuntimeError(f"the state folder {self.dir} holds no run state yet")
        return run

    def save_run(self, run: RunState) -> None:
        """Write the run state, one meta row per field, in the open transaction."""
        values = dataclasses.asdict(run)
        values["wave_variances"] = list(run.wave_variances)
        for key, value in values.items():
            self.write("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))
        self._pending = run

    def get(self, field: str):
        """One run-state field by name; a name that is not a field raises AttributeError."""
        return getattr(self.run, field)

    # ----- counters -----
    def bump(self, name: str, by: int = 1) -> None:
        self.write(
            "INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + ?", (name, by, by)
        )

    def counters(self) -> dict[str, int]:
        return dict(self.read("SELECT name, value FROM counters"))

    # ----- enrolment tokens -----
    def add_token(self, token: str, label: str = "") -> None:
        with self.transaction():
            self.write("INSERT INTO tokens VALUES (?, ?, ?, 0)", (token_hash(token), label, now_ms()))

    def revoke_token(self, token: str) -> bool:
        """Revoke a token and end the sessions of the clients that enrolled with it."""
        h = token_hash(token)
        with self.transaction():
            found = self.write("UPDATE tokens SET revoked=1 WHERE hash=?", (h,)).rowcount
            self.write("UPDATE clients SET active=0, session_hash=NULL WHERE token_hash=?", (h,))
        return bool(found)

    def token_state(self, token: str) -> str:
        rows = self.read("SELECT revoked FROM tokens WHERE hash=?", (token_hash(token),))
        return "unknown" if not rows else ("revoked" if rows[0][0] else "valid")

    # ----- clients -----
    def client_auth(self, client_id: str) -> ClientAuth | None:
        rows = self.read(
            "SELECT session_hash, token_hash, active, secret_hash FROM clients WHERE client_id=?", (client_id,)
        )
        return ClientAuth(rows[0][0], rows[0][1], bool(rows[0][2]), rows[0][3]) if rows else None

    def add_client(
        self, client_id: str, session: str, secret: str, token: str, name: str, caps: dict, examples: int
    ) -> None:
        """A new client; of its session token and secret only hashes are kept."""
        now = now_ms()
        self.write(
            "INSERT INTO clients (client_id, session_hash, secret_hash, token_hash, name, capabilities, "
            "num_examples, joined_ms, last_seen_ms) VALUES (?,?,?,?,?,?,?,?,?)",
            (
                client_id,
                token_hash(session),
                token_hash(secret),
                token_hash(token),
                name,
                json.dumps(caps),
                examples,
                now,
                now,
            ),
        )

    def rejoin_client(self, client_id: str, session: str, name: str, caps: dict, examples: int) -> None:
        self.write(
            "UPDATE clients SET session_hash=?, name=?, capabilities=?, num_examples=?, last_seen_ms=?, "
            "active=1 WHERE client_id=?",
            (token_hash(session), name, json.dumps(caps), examples, now_ms(), client_id),
        )

    def deactivate_client(self, client_id: str) -> None:
        """The client left: it is no longer selected and its open tasks expire."""
        self.write("UPDATE clients SET active=0 WHERE client_id=?", (client_id,))
        self.write("UPDATE tasks SET status='expired' WHERE client_id=? AND status='open'", (client_id,))

    def active_clients(self) -> list[Candidate]:
        rows = self.read("SELECT client_id, answered, failed, capabilities FROM clients WHERE active=1")
        return [Candidate(c, a, f, int(json.loads(caps or "{}").get("cpu_count", 1) or 1)) for c, a, f, caps in rows]

    def count_clients(self) -> int:
        return self.read("SELECT COUNT(*) FROM clients")[0][0]

    def record_last_seen(self, seen: dict[str, int]) -> None:
        for client_id, seen_ms in seen.items():
            self.write("UPDATE clients SET last_seen_ms=? WHERE client_id=?", (seen_ms, client_id))

    # ----- update history and metrics -----
    def add_history(self, record: HistoryRecord, keep: int) -> None:
        """Record an update and forget those ``keep`` versions older."""
        seeds, coefficients = record.seeds.astype("<u8").tobytes(), record.coefficients.astype("<f4").tobytes()
        self.write("INSERT OR REPLACE INTO history VALUES (?,?,?,?)", (record.version, record.lr, seeds, coefficients))
        self.write("DELETE FROM history WHERE version<=?", (record.version - keep,))

    def history_seed_counts(self, after: int, upto: int) -> dict[int, int]:
        """Seeds per kept version in (after, upto], without reading the records."""
        rows = self.read(
            "SELECT version, LENGTH(seeds) / 8 FROM history WHERE version>? AND version<=? ORDER BY version",
            (after, upto),
        )
        return dict(rows)

    def history(self, after: int, upto: int) -> list[HistoryRecord]:
        rows = self.read(
            "SELECT version, lr, seeds, coefficients FROM history WHERE version>? AND version<=? ORDER BY version",
            (after, upto),
        )
        return [HistoryRecord(v, lr, np.frombuffer(s, "<u8"), np.frombuffer(c, "<f4")) for v, lr, s, c in rows]

    def put_metrics(self, row: dict) -> None:
        self.write("INSERT OR REPLACE INTO metrics VALUES (?, ?)", (row["step"], json.dumps(row)))

    def metrics(self) -> list[dict]:
        return [json.loads(row) for (row,) in self.read("SELECT row FROM metrics ORDER BY step")]

    def last_metrics(self) -> dict | None:
        rows = self.read("SELECT row FROM metrics ORDER BY step DESC LIMIT 1")
        return json.loads(rows[0][0]) if rows else None

    def latest_metric_values(self, keys: list[str]) -> dict[str, float]:
        """Each key's value in the latest row that has it (held-out values live only in evaluated rows)."""
        latest = {}
        for key in keys:
            rows = self.read(
                "SELECT json_extract(row, ?) AS v FROM metrics WHERE v IS NOT NULL ORDER BY step DESC LIMIT 1",
                (f"$.{key}",),
            )
            if rows:
                latest[key] = rows[0][0]
        return latest

    def metric_sums(self, keys: list[str]) -> dict[str, float]:
        """Each key's sum over the applied steps' rows (step -1 is the initial evaluation), 0 when none."""
        sums = ", ".join("TOTAL(json_extract(row, ?))" for _ in keys)
        (values,) = self.read(f"SELECT {sums} FROM metrics WHERE step >= 0", [f"$.{k}" for k in keys])
        return dict(zip(keys, values))

    # ----- θ files -----
    def checkpoint_path(self, version: int) -> Path:
        return self.dir / CHECKPOINT_DIR / f"theta-v{version:08d}.safetensors"

    def save_checkpoint(
        self, version: int, layout: ThetaLayout, theta: np.ndarray, extra: dict[str, np.ndarray], keep: int
    ) -> None:
        """theta of ``version`` plus optimiser state; only the last ``keep`` versions stay."""
        write_theta(self.checkpoint_path(version), layout, theta, extra)
        for old in sorted((self.dir / CHECKPOINT_DIR).glob("theta-v*.safetensors"))[:-keep]:
            old.unlink(missing_ok=True)

    def load_checkpoint(self, version: int, layout: ThetaLayout) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        path = self.checkpoint_path(version)
        if not path.is_file():
            raise UserError(
                f"the state folder {self.dir} records theta version {version} but {path.name} is missing; "
                "restore the checkpoints folder or start a new --state folder"
            )
        return read_theta(path, layout)

    def save_named(self, name: str, layout: ThetaLayout, theta: np.ndarray) -> None:
        write_theta(self.dir / name, layout, theta, {})

    def load_named(self, name: str, layout: ThetaLayout) -> np.ndarray:
        return read_theta(self.dir / name, layout)[0]

    def close(self) -> None:
        with self.lock:
            self.db.close()
