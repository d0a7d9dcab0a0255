"""The store's typed rows and the run state: fields by name, so a misspelt one fails instead of reading None.

Rows leave the store (state.py) only as these types; nothing else indexes a SQL row by position.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np


@dataclass(frozen=True)
class RunState:
    """Where the run stands; replaced as a whole (``dataclasses.replace``) and saved in the transaction
    that commits the change, so a restart resumes exactly at the last commit."""

    fingerprint: str
    step: int = 0
    wave: int = 0
    wave_open: bool = False
    wave_deadline_ms: int = 0
    next_ordinal: int = 0  # seed ordinals of this step already consumed (never reused)
    finished: bool = False
    step_ready: bool = False  # the closed step is to be applied (decided before a crash, maybe not yet applied)
    var0: float | None = None  # step 0's first-wave variance (variance mode "relative")
    wave_variances: tuple[float, ...] = ()
    step_started_ms: int = 0
    best_eval_loss: float | None = None
    best_version: int | None = None
    evals_since_best: int = 0

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @property
    def theta_version(self) -> int:
        """The θ version the open step perturbs (version 1 is the bundle's θ)."""
        return self.step + 1


class ClientAuth(NamedTuple):
    session_hash: str | None
    token_hash: str
    active: bool
    secret_hash: str | None  # None for clients enrolled before per-client secrets


class Candidate(NamedTuple):
    """An active client as the selection sees it."""

    client_id: str
    answered: int
    failed: int
    cpu_count: int


@dataclass(frozen=True)
class Task:
    task_id: str
    step: int
    wave: int
    client_id: str
    seeds: np.ndarray  # uint64
    explicit: bool  # sampler seeds, listed one by one (otherwise a contiguous range)
    batch_start: int
    batch_size: int
    deadline_ms: int
    status: str  # open | accepted | cancelled | expired

    @property
    def theta_version(self) -> int:
        return self.step + 1


@dataclass(frozen=True)
class Result:
    task_id: str
    step: int
    wave: int
    client_id: str
    seeds: np.ndarray  # uint64
    jvp: np.ndarray  # float32, NaN where the device flagged a non-finite value
    nonfinite: np.ndarray  # uint32 indices
    loss_mean: float | None
    num_examples: int
    bytes_up: int
    received_ms: int
    digest: str


class HistoryRecord(NamedTuple):
    """The update that made θ ``version``, as devices replay it from its seeds."""

    version: int
    lr: float
    seeds: np.ndarray
    coefficients: np.ndarray
