"""fwdllm's task and result as Flower records: seeds down in a ConfigRecord, scalars up in a MetricRecord.

A train message carries one task (``task``), and when the node's θ is not the task's version either
θ itself (``theta``, an ArrayRecord) or the update history that rebuilds it (``history``: the
serialized FetchHistoryResponse the gRPC coordinator would send). The reply carries the device's
``TaskResult`` field by field. Both ends import this module, so the names are defined once.
"""

from __future__ import annotations

from dataclasses import fields

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fwdllm.device_runtime.work import Task, TaskResult
from fwdllm.proto.names import DifferenceScheme, Distribution
from fwdllm.proto.v1 import fwdllm_pb2 as pb

TASK, THETA, HISTORY, RESULT, NODE = "task", "theta", "history", "result", "node"


def task_records(
    work: Task, task_id: str, step: int, version: int, fingerprint: str, base: int, job: dict[str, str]
) -> ConfigRecord:
    """The task for a node that holds θ version ``base`` (0: none). ``job`` names the bundle, partition folder
    and backend a simulated node uses when its node config does not name its own."""
    return ConfigRecord(
        {
            "task_id": task_id,
            "step": step,
            "theta_version": version,
            "base_version": base,
            "fingerprint": fingerprint,
            "seeds": [int(s) for s in work.seeds],
            "batch_start": work.batch_start,
            "batch_size": work.batch_size,
            "epsilon": float(work.epsilon),
            "scheme": str(work.scheme),
            "distribution": str(work.distribution),
            **job,
        }
    )


def task_from_records(config: ConfigRecord) -> Task:
    return Task(
        seeds=[int(s) for s in config["seeds"]],
        batch_start=int(config["batch_start"]),
        batch_size=int(config["batch_size"]),
        epsilon=float(config["epsilon"]),
        scheme=DifferenceScheme(str(config["scheme"])),
        distribution=Distribution(str(config["distribution"])),
    )


def theta_record(theta: np.ndarray) -> ArrayRecord:
    return ArrayRecord({THETA: Array(np.ascontiguousarray(theta, dtype=np.float32))})


def history_record(history: pb.FetchHistoryResponse) -> ConfigRecord:
    return ConfigRecord({HISTORY: history.SerializeToString()})


def result_record(result: TaskResult, theta_version: int) -> MetricRecord:
    """Every field of the result (``jvp`` as floats: float32 survives the float64 round trip exactly)."""
    values: dict = {"theta_version": theta_version}
    for f in fields(TaskResult):
        value = getattr(result, f.name)
        if isinstance(value, np.ndarray):
            value = value.astype(np.float64).tolist()
        elif isinstance(value, list):
            value = [int(v) for v in value]
        values[f.name] = value
    return MetricRecord(values)


def result_from_record(record: MetricRecord) -> TaskResult:
    values = {f.name: record[f.name] for f in fields(TaskResult)}
    values["jvp"] = np.asarray(values["jvp"], dtype=np.float32)
    values["seeds"] = [int(s) for s in values["seeds"]]
    values["nonfinite"] = [int(i) for i in values["nonfinite"]]
    return TaskResult(**values)


def reply_content(result: TaskResult, theta_version: int, task_id: str) -> RecordDict:
    return RecordDict({RESULT: result_record(result, theta_version), TASK: ConfigRecord({"task_id": task_id})})
