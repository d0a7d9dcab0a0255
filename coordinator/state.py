"""Durable coordinator state: SQLite (WAL) for everything small, safetensors checkpoints for theta.

The commit points are SQLite transactions: a task (and the seed ordinals it consumed) is
committed before a device sees it, a result before the device hears "accepted", and a step
is applied by writing the next checkpoint file first and then advancing the step counter in
one transaction. A SIGKILL between the two leaves the old step open with all its results,
so the restart recomputes the same update bit for bit and overwrites the file. WAL with
synchronous=NORMAL survives any process crash (only an OS crash could lose the last commit).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

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
  failed INTEGER DEFAULT 0, active INTEGER DEFAULT 1);
CREATE TABLE IF NOT EXISTS tasks (
  task_id TEXT PRIMARY KEY, step INTEGER, wave INTEGER, client_id TEXT, seeds BLOB, explicit INTEGER,
  batch_start INTEGER, batch_size INTEGER, deadline_ms INTEGER, status TEXT);
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
    """One SQLite connection shared under a lock; every write goes through ``transaction``."""

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
        # meta is read on every request: served from memory, written through, updated on commit only.
        self._meta = {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM meta")}
        self._pending: dict = {}

    @contextmanager
    def transaction(self):
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            self._pending = {}
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                self._pending = {}
                raise
            self.db.execute("COMMIT")
            self._meta.update(self._pending)
            self._pending = {}

    def query(self, sql: str, args=()) -> list[tuple]:
        with self.lock:
            return self.db.execute(sql, args).fetchall()

    # ----- meta and counters -----
    def get(self, key: str, default=None):
        with self.lock:  # the thread inside a transaction reads its own writes; others wait for the commit
            if key in self._pending:
                return self._pending[key]
            return self._meta.get(key, default)

    def put(self, db, key: str, value) -> None:
        """Set a meta value inside a ``transaction``; readers see it once that commits."""
        db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))
        self._pending[key] = json.loads(json.dumps(value))

    @staticmethod
    def bump(db, name: str, by: int = 1) -> None:
        db.execute(
            "INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + ?", (name, by, by)
        )

    def counters(self) -> dict[str, int]:
        return dict(self.query("SELECT name, value FROM counters"))

    # ----- enrolment tokens -----
    def add_token(self, token: str, label: str = "") -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO tokens VALUES (?, ?, ?, 0)", (token_hash(token), label, now_ms()))

    def revoke_token(self, token: str) -> bool:
        """Revoke a token and end the sessions of the clients that enrolled with it."""
        h = token_hash(token)
        with self.transaction() as db:
            found = db.execute("UPDATE tokens SET revoked=1 WHERE hash=?", (h,)).rowcount
            db.execute("UPDATE clients SET active=0, session_hash=NULL WHERE token_hash=?", (h,))
        return bool(found)

    def token_state(self, token: str) -> str:
        rows = self.query("SELECT revoked FROM tokens WHERE hash=?", (token_hash(token),))
        return "unknown" if not rows else ("revoked" if rows[0][0] else "valid")

    # ----- checkpoints -----
    def checkpoint_path(self, version: int) -> Path:
        return self.dir / CHECKPOINT_DIR / f"theta-v{version:08d}.safetensors"

    def _write(self, path: Path, layout: ThetaLayout, theta: np.ndarray, extra: dict[str, np.ndarray]) -> None:
        """theta as named tensors (like a bundle's theta.safetensors) plus extra arrays, written atomically."""
        from safetensors.numpy import save_file

        tensors = {k: np.ascontiguousarray(v) for k, v in layout.split(np.asarray(theta, dtype=np.float32)).items()}
        tensors.update({f"__state__.{k}": np.ascontiguousarray(v, dtype=np.float32) for k, v in extra.items()})
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        tmp.replace(path)

    def save_checkpoint(
        self, version: int, layout: ThetaLayout, theta: np.ndarray, extra: dict[str, np.ndarray], keep: int
    ) -> None:
        """theta of ``version`` plus optimiser state; only the last ``keep`` versions stay."""
        self._write(self.checkpoint_path(version), layout, theta, extra)
        for old in sorted((self.dir / CHECKPOINT_DIR).glob("theta-v*.safetensors"))[:-keep]:
            old.unlink(missing_ok=True)

    def save_named(self, name: str, layout: ThetaLayout, theta: np.ndarray) -> None:
        self._write(self.dir / name, layout, theta, {})

    def load_named(self, name: str, layout: ThetaLayout) -> np.ndarray:
        from safetensors.numpy import load_file

        return layout.flatten(load_file(str(self.dir / name)))

    def load_checkpoint(self, version: int, layout: ThetaLayout) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        from safetensors.numpy import load_file

        path = self.checkpoint_path(version)
        if not path.is_file():
            raise UserError(
                f"the state folder {self.dir} records theta version {version} but {path.name} is missing; "
                "restore the checkpoints folder or start a new --state folder"
            )
        tensors = load_file(str(path))
        extra = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("__state__.")}
        return layout.flatten({k: v for k, v in tensors.items() if not k.startswith("__state__.")}), extra

    def close(self) -> None:
        with self.lock:
            self.db.close()
