from collections.abc import Iterable as _Iterable
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper

DESCRIPTOR: _descriptor.FileDescriptor

class ProtocolVersion(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROTOCOL_VERSION_UNSPECIFIED: _ClassVar[ProtocolVersion]
    PROTOCOL_VERSION_1: _ClassVar[ProtocolVersion]

class DifferenceScheme(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DIFFERENCE_SCHEME_UNSPECIFIED: _ClassVar[DifferenceScheme]
    CENTRAL: _ClassVar[DifferenceScheme]
    FORWARD: _ClassVar[DifferenceScheme]

class Distribution(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DISTRIBUTION_UNSPECIFIED: _ClassVar[Distribution]
    GAUSSIAN: _ClassVar[Distribution]
    RADEMACHER: _ClassVar[Distribution]

class HistoryRefusal(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HISTORY_REFUSAL_UNSPECIFIED: _ClassVar[HistoryRefusal]
    HISTORY_NOT_REPLAYABLE: _ClassVar[HistoryRefusal]
    HISTORY_NOT_KEPT: _ClassVar[HistoryRefusal]
    HISTORY_OVER_CAP: _ClassVar[HistoryRefusal]

PROTOCOL_VERSION_UNSPECIFIED: ProtocolVersion
PROTOCOL_VERSION_1: ProtocolVersion
DIFFERENCE_SCHEME_UNSPECIFIED: DifferenceScheme
CENTRAL: DifferenceScheme
FORWARD: DifferenceScheme
DISTRIBUTION_UNSPECIFIED: Distribution
GAUSSIAN: Distribution
RADEMACHER: Distribution
HISTORY_REFUSAL_UNSPECIFIED: HistoryRefusal
HISTORY_NOT_REPLAYABLE: HistoryRefusal
HISTORY_NOT_KEPT: HistoryRefusal
HISTORY_OVER_CAP: HistoryRefusal

class Capabilities(_message.Message):
    __slots__ = (
        "backend",
        "delegates",
        "precision",
        "memory_bytes",
        "abi",
        "os",
        "cpu_count",
        "max_perturbations_per_call",
        "versions",
    )
    class VersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: str | None = ..., value: str | None = ...) -> None: ...

    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DELEGATES_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    ABI_FIELD_NUMBER: _ClassVar[int]
    OS_FIELD_NUMBER: _ClassVar[int]
    CPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    MAX_PERTURBATIONS_PER_CALL_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    backend: str
    delegates: _containers.RepeatedScalarFieldContainer[str]
    precision: str
    memory_bytes: int
    abi: str
    os: str
    cpu_count: int
    max_perturbations_per_call: int
    versions: _containers.ScalarMap[str, str]
    def __init__(
        self,
        backend: str | None = ...,
        delegates: _Iterable[str] | None = ...,
        precision: str | None = ...,
        memory_bytes: int | None = ...,
        abi: str | None = ...,
        os: str | None = ...,
        cpu_count: int | None = ...,
        max_perturbations_per_call: int | None = ...,
        versions: _Mapping[str, str] | None = ...,
    ) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = (
        "protocol_version",
        "enrolment_token",
        "client_name",
        "capabilities",
        "model_fingerprint",
        "num_examples",
        "previous_client_id",
    )
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ENROLMENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    protocol_version: ProtocolVersion
    enrolment_token: str
    client_name: str
    capabilities: Capabilities
    model_fingerprint: str
    num_examples: int
    previous_client_id: str
    def __init__(
        self,
        protocol_version: ProtocolVersion | str | None = ...,
        enrolment_token: str | None = ...,
        client_name: str | None = ...,
        capabilities: Capabilities | _Mapping | None = ...,
        model_fingerprint: str | None = ...,
        num_examples: int | None = ...,
        previous_client_id: str | None = ...,
    ) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = (
        "client_id",
        "session_token",
        "protocol_version",
        "model_fingerprint",
        "theta_dim",
        "theta_version",
        "heartbeat_interval_ms",
    )
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    THETA_DIM_FIELD_NUMBER: _ClassVar[int]
    THETA_VERSION_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    session_token: str
    protocol_version: ProtocolVersion
    model_fingerprint: str
    theta_dim: int
    theta_version: int
    heartbeat_interval_ms: int
    def __init__(
        self,
        client_id: str | None = ...,
        session_token: str | None = ...,
        protocol_version: ProtocolVersion | str | None = ...,
        model_fingerprint: str | None = ...,
        theta_dim: int | None = ...,
        theta_version: int | None = ...,
        heartbeat_interval_ms: int | None = ...,
    ) -> None: ...

class PullTaskRequest(_message.Message):
    __slots__ = ("client_id", "session_token", "theta_version")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    THETA_VERSION_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    session_token: str
    theta_version: int
    def __init__(
        self, client_id: str | None = ..., session_token: str | None = ..., theta_version: int | None = ...
    ) -> None: ...

class SeedRange(_message.Message):
    __slots__ = ("start", "count")
    START_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    start: int
    count: int
    def __init__(self, start: int | None = ..., count: int | None = ...) -> None: ...

class BatchRef(_message.Message):
    __slots__ = ("start", "size")
    START_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    start: int
    size: int
    def __init__(self, start: int | None = ..., size: int | None = ...) -> None: ...

class Task(_message.Message):
    __slots__ = (
        "task_id",
        "step",
        "wave",
        "theta_version",
        "seeds",
        "seed_ranges",
        "distribution",
        "epsilon",
        "scheme",
        "batch",
        "deadline_unix_ms",
    )
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    WAVE_FIELD_NUMBER: _ClassVar[int]
    THETA_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    SEED_RANGES_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    step: int
    wave: int
    theta_version: int
    seeds: _containers.RepeatedScalarFieldContainer[int]
    seed_ranges: _containers.RepeatedCompositeFieldContainer[SeedRange]
    distribution: Distribution
    epsilon: float
    scheme: DifferenceScheme
    batch: BatchRef
    deadline_unix_ms: int
    def __init__(
        self,
        task_id: str | None = ...,
        step: int | None = ...,
        wave: int | None = ...,
        theta_version: int | None = ...,
        seeds: _Iterable[int] | None = ...,
        seed_ranges: _Iterable[SeedRange | _Mapping] | None = ...,
        distribution: Distribution | str | None = ...,
        epsilon: float | None = ...,
        scheme: DifferenceScheme | str | None = ...,
        batch: BatchRef | _Mapping | None = ...,
        deadline_unix_ms: int | None = ...,
    ) -> None: ...

class PullTaskResponse(_message.Message):
    __slots__ = ("task", "retry_after_ms", "run_finished")
    TASK_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    RUN_FINISHED_FIELD_NUMBER: _ClassVar[int]
    task: Task
    retry_after_ms: int
    run_finished: bool
    def __init__(
        self,
        task: Task | _Mapping | None = ...,
        retry_after_ms: int | None = ...,
        run_finished: bool | None = ...,
    ) -> None: ...

class LossStats(_message.Message):
    __slots__ = ("mean", "min", "max", "base")
    MEAN_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    mean: float
    min: float
    max: float
    base: float
    def __init__(
        self,
        mean: float | None = ...,
        min: float | None = ...,
        max: float | None = ...,
        base: float | None = ...,
    ) -> None: ...

class SubmitRequest(_message.Message):
    __slots__ = (
        "client_id",
        "session_token",
        "task_id",
        "step",
        "seeds",
        "jvp",
        "nonfinite",
        "loss",
        "num_examples",
        "compute_time_ms",
    )
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    JVP_FIELD_NUMBER: _ClassVar[int]
    NONFINITE_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    session_token: str
    task_id: str
    step: int
    seeds: _containers.RepeatedScalarFieldContainer[int]
    jvp: _containers.RepeatedScalarFieldContainer[float]
    nonfinite: _containers.RepeatedScalarFieldContainer[int]
    loss: LossStats
    num_examples: int
    compute_time_ms: int
    def __init__(
        self,
        client_id: str | None = ...,
        session_token: str | None = ...,
        task_id: str | None = ...,
        step: int | None = ...,
        seeds: _Iterable[int] | None = ...,
        jvp: _Iterable[float] | None = ...,
        nonfinite: _Iterable[int] | None = ...,
        loss: LossStats | _Mapping | None = ...,
        num_examples: int | None = ...,
        compute_time_ms: int | None = ...,
    ) -> None: ...

class SubmitResponse(_message.Message):
    __slots__ = ("accepted", "message", "duplicate")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    message: str
    duplicate: bool
    def __init__(
        self, accepted: bool | None = ..., message: str | None = ..., duplicate: bool | None = ...
    ) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("client_id", "session_token", "task_id")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    session_token: str
    task_id: str
    def __init__(
        self, client_id: str | None = ..., session_token: str | None = ..., task_id: str | None = ...
    ) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("cancel_task_ids", "theta_version", "server_time_unix_ms")
    CANCEL_TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    THETA_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    cancel_task_ids: _containers.RepeatedScalarFieldContainer[str]
    theta_version: int
    server_time_unix_ms: int
    def __init__(
        self,
        cancel_task_ids: _Iterable[str] | None = ...,
        theta_version: int | None = ...,
        server_time_unix_ms: int | None = ...,
    ) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("client_id", "session_token", "reason")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    session_token: str
    reason: str
    def __init__(
        self, client_id: str | None = ..., session_token: str | None = ..., reason: str | None = ...
    ) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FetchParametersRequest(_message.Message):
    __slots__ = ("client_id", "session_token", "version", "chunk_values")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_VALUES_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    session_token: str
    version: int
    chunk_values: int
    def __init__(
        self,
        client_id: str | None = ...,
        session_token: str | None = ...,
        version: int | None = ...,
        chunk_values: int | None = ...,
    ) -> None: ...

class ParameterChunk(_message.Message):
    __slots__ = ("version", "offset", "total", "values", "sha256")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    version: int
    offset: int
    total: int
    values: bytes
    sha256: str
    def __init__(
        self,
        version: int | None = ...,
        offset: int | None = ...,
        total: int | None = ...,
        values: bytes | None = ...,
        sha256: str | None = ...,
    ) -> None: ...

class FetchHistoryRequest(_message.Message):
    __slots__ = ("client_id", "session_token", "from_version", "to_version", "max_bytes", "max_seeds")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_SEEDS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    session_token: str
    from_version: int
    to_version: int
    max_bytes: int
    max_seeds: int
    def __init__(
        self,
        client_id: str | None = ...,
        session_token: str | None = ...,
        from_version: int | None = ...,
        to_version: int | None = ...,
        max_bytes: int | None = ...,
        max_seeds: int | None = ...,
    ) -> None: ...

class UpdateRecord(_message.Message):
    __slots__ = ("version", "lr", "seeds", "coefficients", "distribution")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    COEFFICIENTS_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    version: int
    lr: float
    seeds: _containers.RepeatedScalarFieldContainer[int]
    coefficients: _containers.RepeatedScalarFieldContainer[float]
    distribution: Distribution
    def __init__(
        self,
        version: int | None = ...,
        lr: float | None = ...,
        seeds: _Iterable[int] | None = ...,
        coefficients: _Iterable[float] | None = ...,
        distribution: Distribution | str | None = ...,
    ) -> None: ...

class FetchHistoryResponse(_message.Message):
    __slots__ = ("available", "updates", "theta_dim", "refusal")
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    THETA_DIM_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    available: bool
    updates: _containers.RepeatedCompositeFieldContainer[UpdateRecord]
    theta_dim: int
    refusal: HistoryRefusal
    def __init__(
        self,
        available: bool | None = ...,
        updates: _Iterable[UpdateRecord | _Mapping] | None = ...,
        theta_dim: int | None = ...,
        refusal: HistoryRefusal | str | None = ...,
    ) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = (
        "model_fingerprint",
        "step",
        "theta_version",
        "clients_registered",
        "clients_active",
        "counters",
        "metrics",
        "finished",
    )
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: str | None = ..., value: int | None = ...) -> None: ...

    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: str | None = ..., value: float | None = ...) -> None: ...

    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    THETA_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_REGISTERED_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    model_fingerprint: str
    step: int
    theta_version: int
    clients_registered: int
    clients_active: int
    counters: _containers.ScalarMap[str, int]
    metrics: _containers.ScalarMap[str, float]
    finished: bool
    def __init__(
        self,
        model_fingerprint: str | None = ...,
        step: int | None = ...,
        theta_version: int | None = ...,
        clients_registered: int | None = ...,
        clients_active: int | None = ...,
        counters: _Mapping[str, int] | None = ...,
        metrics: _Mapping[str, float] | None = ...,
        finished: bool | None = ...,
    ) -> None: ...
