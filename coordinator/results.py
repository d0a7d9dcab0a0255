"""Checking a submitted result against its task before it is stored and counted as accepted.

A result is accepted once: the same content again is answered as a duplicate (a device whose
acknowledgement was lost retries), different content for an accepted task is refused, and both hold
after the task's step is applied (the digest stays with the task), so a result whose reply a
coordinator crash swallowed is a duplicate when resubmitted to the restarted one.
"""

from __future__ import annotations

import hashlib

import numpy as np

from fwdllm.coordinator.messages import Reason, Receipt, Reject, Submission
from fwdllm.coordinator.records import Result, Task
from fwdllm.coordinator.state import Store


def digest(sub: Submission) -> str:
    return hashlib.sha256(
        np.asarray(sub.seeds, "<u8").tobytes()
        + np.asarray(sub.jvp, "<f4").tobytes()
        + np.asarray(sub.nonfinite, "<u4").tobytes()
    ).hexdigest()


def _task_of(store: Store, sub: Submission) -> Task:
    task = store.tasks.get(sub.task_id)
    if task is None:
        raise Reject(Reason.UNKNOWN_TASK, f"no task {sub.task_id[:64]!r} exists")
    if task.client_id != sub.who.client_id:
        raise Reject(Reason.NOT_YOUR_TASK, "this task was handed to another client")
    if sub.step != task.step:
        raise Reject(
            Reason.WRONG_ROUND, f"task {task.task_id} belongs to step {task.step}, the submit says step {sub.step}"
        )
    return task


def _checked(task: Task, sub: Submission, now: int) -> tuple[np.ndarray, np.ndarray]:
    """The result's jvp (flagged values set to NaN, for aggregation to drop) and flagged indices."""
    if task.status != "open":
        raise Reject(Reason.CANCELLED, f"task {task.task_id} was {task.status}: its wave no longer needs it")
    if now > task.deadline_ms:
        raise Reject(Reason.LATE, f"the task's deadline passed {now - task.deadline_ms} ms ago")
    seeds = np.asarray(sub.seeds, dtype=np.uint64)
    if seeds.shape != task.seeds.shape or not np.array_equal(seeds, task.seeds):
        raise Reject(
            Reason.WRONG_SEEDS, f"the submit's seeds differ from the {task.seeds.size} seeds of task {task.task_id}"
        )
    jvp = np.array(sub.jvp, dtype=np.float32)
    if jvp.size != seeds.size:
        raise Reject(Reason.MALFORMED, f"{jvp.size} jvp values for {seeds.size} seeds")
    flagged = np.asarray(sub.nonfinite, dtype=np.int64)
    if flagged.size and (flagged.min() < 0 or flagged.max() >= seeds.size or np.unique(flagged).size != flagged.size):
        raise Reject(Reason.MALFORMED, "nonfinite holds indices outside the task's seeds or repeats one")
    unflagged = ~np.isfinite(jvp)
    unflagged[flagged] = False
    if unflagged.any():
        raise Reject(Reason.NONFINITE, f"jvp holds {int(unflagged.sum())} NaN/Inf values not listed in nonfinite")
    jvp[flagged] = np.nan
    return jvp, flagged


def receive(store: Store, sub: Submission, step: int, now: int) -> Receipt:
    """Check ``sub`` against its task and commit it; the caller then moves the wave on."""
    task = _task_of(store, sub)
    content = digest(sub)
    if task.status == "accepted":
        if store.results.digest(task.task_id) == content:
            with store.transaction():
                store.bump("duplicate")
            return Receipt(duplicate=True, message="already accepted; nothing changed")
        raise Reject(Reason.DUPLICATE, "a different result for this task was already accepted")
    if task.step != step:
        raise Reject(Reason.STALE, f"step {task.step} is closed (the run is at step {step}); pull a new task")
    jvp, flagged = _checked(task, sub, now)
    result = Result(
        task_id=task.task_id,
        step=task.step,
        wave=task.wave,
        client_id=task.client_id,
        seeds=task.seeds,
        jvp=jvp,
        nonfinite=flagged,
        loss_mean=float(sub.loss_mean),
        num_examples=int(sub.num_examples),
        bytes_up=int(sub.nbytes),
        received_ms=now,
        digest=content,
    )
    with store.transaction():
        store.results.add(result)
        store.bump("accepted")
        if flagged.size:
            store.bump("dropped_nonfinite", int(flagged.size))
    return Receipt(duplicate=False, message="accepted")
