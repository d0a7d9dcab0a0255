"""The protocol's task and result messages, as the transport-free ``Task`` and ``TaskResult`` of work.py."""

from __future__ import annotations

from fwdllm.device_runtime.engine import EngineError
from fwdllm.device_runtime.work import DEFAULT_EPSILON, Task, TaskResult
from fwdllm.proto.names import DifferenceScheme, Distribution
from fwdllm.proto.v1 import fwdllm_pb2 as pb


def task_seeds(task: pb.Task) -> list[int]:
    """The task's seeds in order: the explicit ones, then each range."""
    seeds = [int(s) for s in task.seeds]
    for r in task.seed_ranges:
        seeds.extend(range(int(r.start), int(r.start) + int(r.count)))
    return seeds


def task_from_pb(task: pb.Task) -> Task:
    """The task to compute; an ``EngineError`` when it names a scheme or distribution this version lacks."""
    try:
        scheme, distribution = DifferenceScheme.from_wire(task.scheme), Distribution.from_wire(task.distribution)
    except ValueError as exc:
        raise EngineError(f"the task cannot be computed here: {exc}") from None
    return Task(
        seeds=task_seeds(task),
        batch_start=task.batch.start,
        batch_size=task.batch.size,
        epsilon=task.epsilon or DEFAULT_EPSILON,
        scheme=scheme,
        distribution=distribution,
    )


def submit_request(task: pb.Task, result: TaskResult, compute_time_ms: int) -> pb.SubmitRequest:
    """The Submit for ``result`` (client id and session token are filled in when it is sent)."""
    return pb.SubmitRequest(
        task_id=task.task_id,
        step=task.step,
        seeds=result.seeds,
        jvp=result.jvp.tolist(),
        nonfinite=result.nonfinite,
        loss=pb.LossStats(mean=result.loss_mean, min=result.loss_min, max=result.loss_max, base=result.loss_base),
        num_examples=result.num_examples,
        compute_time_ms=compute_time_ms,
    )
