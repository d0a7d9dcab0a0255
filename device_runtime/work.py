"""A device's whole job for one task, free of any transport: batch, perturbed losses, scalars to submit.

The gRPC client (client.py), the in-process simulator (fwdllm/simulate_inprocess.py) and the
benchmarks all call ``do_task``, so what they measure and what a phone computes is one code path.
Turning protobuf messages into a ``Task`` and a ``TaskResult`` into a Submit is messages.py's job.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np

from fwdllm.device_runtime.backend import Backend, Batch, Tokenizer
from fwdllm.device_runtime.engine import GradientResult, forward_gradients
from fwdllm.device_runtime.examples import Example, select
from fwdllm.proto.names import DifferenceScheme, Distribution

DEFAULT_EPSILON = 0.01


@dataclass(frozen=True)
class Task:
    """What the coordinator asks: the seeds (one perturbation each), how to difference, which local examples."""

    seeds: list[int]
    batch_start: int
    batch_size: int
    epsilon: float = DEFAULT_EPSILON
    scheme: DifferenceScheme = DifferenceScheme.CENTRAL
    distribution: Distribution = Distribution.GAUSSIAN

    @property
    def perturbations(self) -> int:
        return len(self.seeds)


@dataclass
class TaskResult(GradientResult):
    """What the device reports: the engine's result for the task's seeds, the batch size and the device time."""

    num_examples: int = 0
    device_seconds: float = 0.0  # tokenising the batch and computing the losses


@dataclass
class LocalData:
    """A device's own examples and the bundle's tokenizer that turns a task's slice of them into a batch."""

    examples: list[Example]
    tokenizer: Tokenizer

    def batch(self, start: int, size: int) -> Batch:
        return self.tokenizer.batch(select(self.examples, start, size))


def do_task(
    task: Task,
    backend: Backend,
    data: LocalData,
    theta: np.ndarray,
    *,
    max_seeds: int | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TaskResult:
    """Compute ``task`` at ``theta`` on this device's data; raises ``Cancelled`` when ``should_stop`` says so."""
    started = time.perf_counter()
    batch = data.batch(task.batch_start, task.batch_size)
    gradient = forward_gradients(
        backend,
        batch,
        theta,
        task.seeds,
        epsilon=task.epsilon,
        scheme=task.scheme,
        distribution=task.distribution,
        max_seeds=max_seeds,
        should_stop=should_stop,
    )
    return TaskResult(
        **{f.name: getattr(gradient, f.name) for f in fields(gradient)},
        num_examples=task.batch_size,
        device_seconds=time.perf_counter() - started,
    )
