"""The tasks and results tables of the coordinator's store (state.py): their SQL and their typed rows.

Kept beside ``Store`` because they are its tables: they write and read through the store's one
connection, inside the caller's transaction, and hand back only ``records.py`` types.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fwdllm.coordinator.records import Result, Task

if TYPE_CHECKING:
    from fwdllm.coordinator.state import Store

TASK_COLUMNS = "task_id, step, wave, client_id, seeds, explicit, batch_start, batch_size, deadline_ms, status"
LIVE = "('open','accepted')"


def _task(row: tuple) -> Task:
    task_id, step, wave, client_id, seeds, explicit, batch_start, batch_size, deadline_ms, status = row
    seeds = np.frombuffer(seeds, "<u8")
    return Task(task_id, step, wave, client_id, seeds, bool(explicit), batch_start, batch_size, deadline_ms, status)


def _result(row: tuple) -> Result:
    task_id, step, wave, client_id, seeds, jvp, nonfinite, *rest = row
    arrays = np.frombuffer(seeds, "<u8"), np.frombuffer(jvp, "<f4"), np.frombuffer(nonfinite, "<u4")
    return Result(task_id, step, wave, client_id, *arrays, *rest)


class Tasks:
    """The tasks table: what was handed to whom, and what became of it."""

    def __init__(self, store: Store):
        self.store = store

    def add(self, task: Task) -> None:
        self.store.write(
            f"INSERT INTO tasks ({TASK_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                task.task_id,
                task.step,
                task.wave,
                task.client_id,
                task.seeds.astype("<u8").tobytes(),
                int(task.explicit),
                task.batch_start,
                task.batch_size,
                task.deadline_ms,
                task.status,
            ),
        )

    def get(self, task_id: str) -> Task | None:
        rows = self.store.read(f"SELECT {TASK_COLUMNS} FROM tasks WHERE task_id=?", (task_id,))
        return _task(rows[0]) if rows else None

    def live_of(self, client_id: str, step: int, wave: int) -> Task | None:
        """The client's open or accepted task of this wave, if it holds one."""
        rows = self.store.read(
            f"SELECT {TASK_COLUMNS} FROM tasks WHERE step=? AND wave=? AND client_id=? AND status IN {LIVE}",
            (step, wave, client_id),
        )
        return _task(rows[0]) if rows else None

    def count_live(self, step: int, wave: int) -> int:
        return self.store.read(
            f"SELECT COUNT(*) FROM tasks WHERE step=? AND wave=? AND status IN {LIVE}", (step, wave)
        )[0][0]

    def open_of(self, step: int) -> list[Task]:
        """This step's open tasks."""
        rows = self.store.read(f"SELECT {TASK_COLUMNS} FROM tasks WHERE step=? AND status='open'", (step,))
        return [_task(r) for r in rows]

    def expire(self, task: Task) -> None:
        """The task's deadline passed: it expires and counts as a failure of its client."""
        self.store.write("UPDATE tasks SET status='expired' WHERE task_id=?", (task.task_id,))
        self.store.write("UPDATE clients SET failed=failed+1 WHERE client_id=?", (task.client_id,))

    def cancel_open(self, step: int) -> int:
        return self.store.write("UPDATE tasks SET status='cancelled' WHERE step=? AND status='open'", (step,)).rowcount

    def dropped_ids(self, client_id: str, since_step: int) -> list[str]:
        """The client's cancelled or expired tasks of recent steps (heartbeats tell the device to stop them)."""
        rows = self.store.read(
            "SELECT task_id FROM tasks WHERE client_id=? AND step>=? AND status IN ('cancelled','expired')",
            (client_id, since_step),
        )
        return [task_id for (task_id,) in rows]

    def count_expired(self, step: int) -> int:
        return self.store.read("SELECT COUNT(*) FROM tasks WHERE step=? AND status='expired'", (step,))[0][0]


class Results:
    """The open step's accepted results (deleted once the step is applied)."""

    def __init__(self, store: Store):
        self.store = store

    def add(self, result: Result) -> None:
        """Store an accepted result, mark its task accepted and count the answer for its client."""
        r = result
        self.store.write(
            "INSERT INTO results VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                r.task_id,
                r.step,
                r.wave,
                r.client_id,
                r.seeds.astype("<u8").tobytes(),
                r.jvp.astype("<f4").tobytes(),
                r.nonfinite.astype("<u4").tobytes(),
                r.loss_mean,
                r.num_examples,
                r.bytes_up,
                r.received_ms,
                r.digest,
            ),
        )
        self.store.write("UPDATE tasks SET status='accepted', digest=? WHERE task_id=?", (r.digest, r.task_id))
        self.store.write("UPDATE clients SET answered=answered+1 WHERE client_id=?", (r.client_id,))

    def digest(self, task_id: str) -> str | None:
        """The digest of the task's accepted result, kept with the task after its step's results are deleted
        (a state folder from before that keeps it only in the open step's results)."""
        rows = self.store.read(
            "SELECT COALESCE(t.digest, r.digest) FROM tasks t LEFT JOIN results r USING (task_id) WHERE task_id=?",
            (task_id,),
        )
        return rows[0][0] if rows else None

    def count(self, step: int, wave: int) -> int:
        return self.store.read("SELECT COUNT(*) FROM results WHERE step=? AND wave=?", (step, wave))[0][0]

    def of_step(self, step: int) -> list[Result]:
        """The step's accepted results in a fixed order, so a recomputed update is bit-identical."""
        return [_result(r) for r in self.store.read("SELECT * FROM results WHERE step=? ORDER BY task_id", (step,))]

    def clients_of(self, step: int) -> set[str]:
        return {c for (c,) in self.store.read("SELECT DISTINCT client_id FROM results WHERE step=?", (step,))}

    def delete_step(self, step: int) -> None:
        self.store.write("DELETE FROM results WHERE step=?", (step,))
