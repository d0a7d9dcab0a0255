from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

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
    SPARSE_GAUSSIAN_0_1: _ClassVar[Distribution]
    SPARSE_GAUSSIAN_0_01: _ClassVar[Distribution]

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
SPARSE_GAUSSIAN_0_1: Distribution
SPARSE_GAUSSIAN_0_01: Distribution
HISTORY_REFUSAL_UNSPECIFIED: HistoryRefusal
HISTORY_NOT_REPLAYABLE: HistoryRefusal
HISTORY_NOT_KEPT: HistoryRefusal
HISTORY_OVER_CAP: HistoryRefusal

class Capabilities(_message.Message):
    __slots__ = ("backend", "delegates", "precision", "memory_bytes", "abi", "os", "cpu_count", "max_perturbations_per_call", "versions")
    class VersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
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
    def __init__(self, backend: _Optional[str] = ..., delegates: _Optional[_Iterable[str]] = ..., precision: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., abi: _Optional[str] = ..., os: _Optional[str] = ..., cpu_count: _Optional[int] = ..., max_perturbations_per_call: _Optional[int] = ..., versions: _Optional[_Mapping[str, str]] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("protocol_version", "enrolment_token", "client_name", "capabilities", "model_fingerprint", "num_examples", "previous_client_id", "client_secret")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ENROLMENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_SECRET_FIELD_NUMBER: _ClassVar[int]
    protocol_version: ProtocolVersion
    enrolment_token: str
    client_name: str
    capabilities: Capabilities
    model_fingerprint: str
    num_examples: int
    previous_client_id: str
    client_secret: str
    def __init__(self, protocol_version: _Optional[_Union[ProtocolVersion, str]] = ..., enrolment_token: _Optional[str] = ..., client_name: _Optional[str] = ..., capabilities: _Optional[_Union[Capabilities, _Mapping]] = ..., model_fingerprint: _Optional[str] = ..., num_examples: _Optional[int] = ..., previous_client_id: _Optional[str] = ..., client_secret: _Optional[str] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("client_id", "session_token", "protocol_version", "model_fingerprint", "theta_dim", "theta_version", "heartbeat_interval_ms", "client_secret", "pull_wait_ms")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    THETA_DIM_FIELD_NUMBER: _ClassVar[int]
    THETA_VERSION_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_SECRET_FIELD_NUMBER: _ClassVar[int]
    PULL_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    session_token: str
    protocol_version: ProtocolVersion
    model_fingerprint: str
    theta_dim: int
    theta_version: int
    heartbeat_interval_ms: int
    client_secret: str
    pull_wait_ms: int
    def __init__(self, client_id: _Optional[str] = ..., session_token: _Optional[str] = ..., protocol_version: _Optional[_Union[ProtocolVersion, str]] = ..., model_fingerprint: _Optional[str] = ..., theta_dim: _Optional[int] = ..., theta_version: _Optional[int] = ..., heartbeat_interval_ms: _Optional[int] = ..., client_secret: _Optional[str] = ..., pull_wait_ms: _Optional[int] = ...) -> None: ...

class PullTaskRequest(_message.Message):
    __slots__ = ("client_id", "session_token", "theta_version", "wait_ms")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    THETA_VERSION_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    session_token: str
    theta_version: int
    wait_ms: int
    def __init__(self, client_id: _Optional[str] = ..., session_token: _Optional[str] = ..., theta_version: _Optional[int] = ..., wait_ms: _Optional[int] = ...) -> None: ...

class SeedRange(_message.Message):
    __slots__ = ("start", "count")
    START_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    start: int
    count: int
    def __init__(self, start: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class BatchRef(_message.Message):
    __slots__ = ("start", "size")
    START_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    start: int
    size: int
    def __init__(self, start: _Optional[int] = ..., size: _Optional[int] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("task_id", "step", "wave", "theta_version", "seeds", "seed_ranges", "distribution", "epsilon", "scheme", "batch", "deadline_unix_ms")
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
    def __init__(self, task_id: _Optional[str] = ..., step: _Optional[int] = ..., wave: _Optional[int] = ..., theta_version: _Optional[int] = ..., seeds: _Optional[_Iterable[int]] = ..., seed_ranges: _Optional[_Iterable[_Union[SeedRange, _Mapping]]] = ..., distribution: _Optional[_Union[Distribution, str]] = ..., epsilon: _Optional[float] = ..., scheme: _Optional[_Union[DifferenceScheme, str]] = ..., batch: _Optional[_Union[BatchRef, _Mapping]] = ..., deadline_unix_ms: _Optional[int] = ...) -> None: ...

class PullTaskResponse(_message.Message):
    __slots__ = ("task", "retry_after_ms", "run_finished")
    TASK_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    RUN_FINISHED_FIELD_NUMBER: _ClassVar[int]
    task: Task
    retry_after_ms: int
    run_finished: bool
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ..., retry_after_ms: _Optional[int] = ..., run_finished: _Optional[bool] = ...) -> None: ...

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
    def __init__(self, mean: _Optional[float] = ..., min: _Optional[float] = ..., max: _Optional[float] = ..., base: _Optional[float] = ...) -> None: ...

class SubmitRequest(_message.Message):
    __slots__ = ("client_id", "session_token", "task_id", "step", "seeds", "jvp", "nonfinite", "loss", "num_examples", "compute_time_ms")
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
    def __init__(self, client_id: _Optional[str] = ..., session_token: _Optional[str] = ..., task_id: _Optional[str] = ..., step: _Optional[int] = ..., seeds: _Optional[_Iterable[int]] = ..., jvp: _Optional[_Iterable[float]] = ..., nonfinite: _Optional[_Iterable[int]] = ..., loss: _Optional[_Union[LossStats, _Mapping]] = ..., num_examples: _Optional[int] = ..., compute_time_ms: _Optional[int] = ...) -> None: ...

class SubmitResponse(_message.Message):
    __slots__ = ("accepted", "message", "duplicate")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    message: str
    duplicate: bool
    def __init__(self, accepted: _Optional[bool] = ..., message: _Optional[str] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("client_id", "session_token", "task_id")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    session_token: str
    task_id: str
    def __init__(self, client_id: _Optional[str] = ..., session_token: _Optional[str] = ..., task_id: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("cancel_task_ids", "theta_version", "server_time_unix_ms")
    CANCEL_TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    THETA_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    cancel_task_ids: _containers.RepeatedScalarFieldContainer[str]
    theta_version: int
    server_time_unix_ms: int
    def __init__(self, cancel_task_ids: _Optional[_Iterable[str]] = ..., theta_version: _Optional[int] = ..., server_time_unix_ms: _Optional[int] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("client_id", "session_token", "reason")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    session_token: str
    reason: str
    def __init__(self, client_id: _Optional[str] = ..., session_token: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

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
    def __init__(self, client_id: _Optional[str] = ..., session_token: _Optional[str] = ..., version: _Optional[int] = ..., chunk_values: _Optional[int] = ...) -> None: ...

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
    def __init__(self, version: _Optional[int] = ..., offset: _Optional[int] = ..., total: _Optional[int] = ..., values: _Optional[bytes] = ..., sha256: _Optional[str] = ...) -> None: ...

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
    def __init__(self, client_id: _Optional[str] = ..., session_token: _Optional[str] = ..., from_version: _Optional[int] = ..., to_version: _Optional[int] = ..., max_bytes: _Optional[int] = ..., max_seeds: _Optional[int] = ...) -> None: ...

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
    def __init__(self, version: _Optional[int] = ..., lr: _Optional[float] = ..., seeds: _Optional[_Iterable[int]] = ..., coefficients: _Optional[_Iterable[float]] = ..., distribution: _Optional[_Union[Distribution, str]] = ...) -> None: ...

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
    def __init__(self, available: _Optional[bool] = ..., updates: _Optional[_Iterable[_Union[UpdateRecord, _Mapping]]] = ..., theta_dim: _Optional[int] = ..., refusal: _Optional[_Union[HistoryRefusal, str]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("model_fingerprint", "step", "theta_version", "clients_registered", "clients_active", "counters", "metrics", "finished")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
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
    def __init__(self, model_fingerprint: _Optional[str] = ..., step: _Optional[int] = ..., theta_version: _Optional[int] = ..., clients_registered: _Optional[int] = ..., clients_active: _Optional[int] = ..., counters: _Optional[_Mapping[str, int]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., finished: _Optional[bool] = ...) -> None: ...
