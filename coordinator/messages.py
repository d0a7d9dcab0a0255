"""What goes into and comes out of the coordinator core: plain dataclasses, no protobuf, no transport.

The gRPC server (server.py, through wire.py) converts its messages to and from these; anything
else (a test, an in-process simulation) can drive the core with them directly. A refused request
raises ``Reject`` with a transport-neutral ``Reason``; the server chooses the status code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from fwdllm.coordinator.records import HistoryRecord, Task

PROTOCOL_VERSION = 1


class Reason(Enum):
    """Why a request was refused; the value is the counter it adds to."""

    UNKNOWN_CLIENT = "rejected_unknown_client"
    INACTIVE_CLIENT = "rejected_inactive_client"
    BAD_TOKEN = "rejected_bad_token"
    RATE_LIMITED = "rejected_rate_limited"
    PROTOCOL = "rejected_protocol"
    TOKEN_UNKNOWN = "rejected_token_unknown"
    TOKEN_REVOKED = "rejected_token_revoked"
    FINGERPRINT = "rejected_fingerprint"
    SEED_SPACE = "rejected_seed_space"
    UNKNOWN_TASK = "rejected_unknown_task"
    NOT_YOUR_TASK = "rejected_not_your_task"
    WRONG_ROUND = "rejected_wrong_round"
    STALE = "rejected_stale"
    CANCELLED = "rejected_cancelled"
    LATE = "rejected_late"
    WRONG_SEEDS = "rejected_wrong_seeds"
    MALFORMED = "rejected_malformed"
    NONFINITE = "rejected_nonfinite"
    DUPLICATE = "rejected_duplicate"
    UNKNOWN_VERSION = "rejected_unknown_version"


class Reject(Exception):
    """A refused request: the reason (and the counter it adds to) and a message for the device."""

    def __init__(self, reason: Reason, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message

    @property
    def counter(self) -> str:
        return self.reason.value


@dataclass(frozen=True)
class Credentials:
    client_id: str
    session_token: str


@dataclass(frozen=True)
class Capabilities:
    backend: str = ""
    cpu_count: int = 0
    memory_bytes: int = 0
    precision: str = ""
    abi: str = ""
    os: str = ""
    max_perturbations_per_call: int = 0


@dataclass(frozen=True)
class JoinRequest:
    enrolment_token: str
    model_fingerprint: str
    protocol_version: int = PROTOCOL_VERSION
    client_name: str = ""
    num_examples: int = 0
    previous_client_id: str = ""
    client_secret: str = ""  # proves previous_client_id
    capabilities: Capabilities = field(default_factory=Capabilities)


@dataclass(frozen=True)
class Joined:
    client_id: str
    session_token: str
    model_fingerprint: str
    theta_dim: int
    theta_version: int
    heartbeat_interval_ms: int
    client_secret: str = ""  # issued with a new client id only


@dataclass(frozen=True)
class TaskOffer:
    """A task with how to compute it: the perturbations' distribution, the difference scheme and ε."""

    task: Task
    distribution: str
    scheme: str
    epsilon: float


@dataclass(frozen=True)
class Pulled:
    """Exactly one of: a task, a wait (``retry_after_ms``), or the end of the run."""

    offer: TaskOffer | None = None
    retry_after_ms: int = 0
    run_finished: bool = False


@dataclass(frozen=True)
class Submission:
    who: Credentials
    task_id: str
    step: int
    seeds: np.ndarray  # uint64
    jvp: np.ndarray  # float32
    nonfinite: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # indices the device flagged
    loss_mean: float = float("nan")
    num_examples: int = 0
    nbytes: int = 0  # the submission's size on the wire (bytes_up)


@dataclass(frozen=True)
class Receipt:
    duplicate: bool
    message: str


@dataclass(frozen=True)
class Beat:
    cancel_task_ids: list[str]
    theta_version: int
    server_time_ms: int


@dataclass(frozen=True)
class HistoryQuery:
    """Updates after ``from_version`` up to ``to_version`` (0: the latest), within the caps (0: none)."""

    who: Credentials
    from_version: int
    to_version: int = 0
    max_seeds: int = 0
    max_bytes: int = 0


class HistoryRefusal(Enum):
    NOT_REPLAYABLE = "not_replayable"  # the optimiser or aggregation cannot be replayed from seeds
    NOT_KEPT = "not_kept"  # pruned, unknown or not yet written
    OVER_CAP = "over_cap"


@dataclass(frozen=True)
class History:
    """The updates asked for, or (``refusal`` set, no updates) why not: the device then downloads θ."""

    theta_dim: int
    distribution: str
    updates: list[HistoryRecord] = field(default_factory=list)
    refusal: HistoryRefusal | None = None


@dataclass(frozen=True)
class Status:
    model_fingerprint: str
    step: int
    theta_version: int
    clients_registered: int
    clients_active: int
    counters: dict[str, int]
    metrics: dict[str, float]
    finished: bool
