"""Coordinator settings: one dataclass per section of the TOML or JSON file given to `serve --config`.

Every field has a default, so a file names only what it changes; an unknown section or key
is an error naming the known ones (a typo never silently keeps a default).
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from fwdllm.coordinator.optimizer import OptimizerConfig
from fwdllm.device_runtime.backend import BACKENDS, DEFAULT_BACKEND
from fwdllm.errors import UserError
from fwdllm.proto.names import AggregationMethod, DifferenceScheme, Distribution, VarianceMode


@dataclass
class RunConfig:
    steps: int = 300  # optimisation steps T (also the T of the linear decay)
    clients_per_step: int = 10  # results that complete a wave
    perturbations_per_client: int = 1  # seeds per task
    over_select: float = 0.2  # hand out this fraction more tasks than needed to absorb stragglers
    min_clients: int = 1  # active clients needed before a wave opens
    min_results: int = 1  # results that let a wave close at its deadline
    selection: str = "random"  # random | weighted (by past reliability and cpu count)
    # the perturbation's size; not below 1e-2 on a quantised backend: llama.cpp q8_0 rounds activations to 8 bits,
    # and at 1e-3 the decoder recipe ended at 0.761 against 0.820 at 1e-2 (fp32 ONNX: the same at both)
    epsilon: float = 0.01
    scheme: str = DifferenceScheme.CENTRAL
    distribution: str = Distribution.GAUSSIAN
    batch_size: int = 8
    deadline_s: float = 120.0  # per wave; results after a task's deadline are rejected
    seed: int = 0  # client selection randomness
    init_theta: str = ""  # θ file of an earlier run: its tensors (by name) replace the bundle's initial values


@dataclass
class AggregationConfig:
    clip: float = 1e4  # bound on |jvp| of one perturbation; 0 for none
    # with >= 3 results in a step: |jvp| bound at this multiple of the median over results of each one's
    # median |jvp| (5: ~3.4 sigma of Gaussian scalars); raise it for very unequal clients; 0: off
    outlier: float = 5.0
    # each result scaled down to this multiple of the median result's root-mean-square |jvp| (>= 3 results), so one
    # client sending every scalar at the bound weighs like a few honest ones; 0: off (see COORDINATOR.md)
    client_rms: float = 0.0
    loss_outlier: float = 10.0  # likewise: losses beyond this multiple of the median left out of the metric
    method: str = AggregationMethod.MEAN  # trimmed and median: across per-client estimates
    trim: float = 0.1
    chunk: int = 1 << 14  # values per column chunk (cache-sized blocks of seed_group x chunk)
    threads: int = 0  # 0: up to 8 (cpu count)


@dataclass
class VarianceConfig:
    mode: str = VarianceMode.OFF
    probe: str = "all"  # a theta tensor name, or "all"
    threshold: float = 0.1  # mode threshold: absolute split-half variance
    relative: float = 0.25  # mode relative: fraction of step 0's first-wave variance
    max_waves: int = 8  # budget per step
    fixed_waves: int = 1  # mode fixed: waves per step


@dataclass
class SamplerConfig:
    enabled: bool = False
    pool_factor: int = 10  # candidates drawn per perturbation handed out


@dataclass
class ServerConfig:
    max_message_bytes: int = 4 << 20
    rate_per_s: float = 20.0  # per-client requests per second (token bucket)
    rate_burst: int = 40
    heartbeat_ms: int = 5000
    # a task's holder not heard from (beat, pull, anything) for this many heartbeat intervals loses the
    # task at once, and is not selected again until it pulls; 0: wait for the task's deadline
    silent_after_beats: float = 2.0
    retry_ms: int = 500  # how long a device without a task waits before pulling again
    # how long the gRPC server may hold a device's PullTask while it has no task for it, answering as soon as
    # a wave opens, a slot frees or the run ends (capped at heartbeat_ms, so a held device never looks
    # silent; 0: answer at once). A held call costs no thread: 1,000 idle devices then pull 1,000 times per
    # hold instead of twice a second each.
    pull_wait_ms: int = 4000
    active_window_s: float = 60.0  # a client seen this recently counts as active
    workers: int = 32
    checkpoints_keep: int = 5
    history_keep: int = 1000  # update records kept for FetchHistory
    fetch_chunk_values: int = 1 << 18
    # GetStatus: "token" answers in full only to a caller with an enrolment token (`coordinator status
    # --token`), anyone else gets the step, θ version and whether the run finished; "public": in full to anyone
    status_access: str = "token"

    @property
    def pull_hold_ms(self) -> int:
        """How long a PullTask is held at most: ``pull_wait_ms``, at most one heartbeat interval."""
        return max(0, min(self.pull_wait_ms, self.heartbeat_ms))


@dataclass
class EvalConfig:
    every: int = 0  # evaluate every k steps (and after the last); 0: never
    data: str = ""  # held-out examples, JSONL as for devices
    backend: str = DEFAULT_BACKEND
    batch_size: int = 32
    limit: int = 0  # evaluate at most this many examples; 0: all
    patience: int = 0  # stop after this many evaluations without a better eval_loss; 0: never
    restore_best: bool = True  # on such a stop, end on the best theta seen (use a validation split as data)


@dataclass
class CoordinatorConfig:
    run: RunConfig = field(default_factory=RunConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    variance: VarianceConfig = field(default_factory=VarianceConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def check(self) -> None:
        r = self.run
        _choice("run.selection", r.selection, ("random", "weighted"))
        _choice("run.scheme", r.scheme, DifferenceScheme)
        _choice("run.distribution", r.distribution, Distribution)
        _choice("aggregation.method", self.aggregation.method, AggregationMethod)
        _choice("variance.mode", self.variance.mode, VarianceMode)
        _choice("eval.backend", self.eval.backend, BACKENDS)
        _choice("server.status_access", self.server.status_access, ("token", "public"))
        for name, value in [
            ("run.steps", r.steps),
            ("run.clients_per_step", r.clients_per_step),
            ("run.perturbations_per_client", r.perturbations_per_client),
            ("run.batch_size", r.batch_size),
            ("run.min_results", r.min_results),
            ("variance.max_waves", self.variance.max_waves),
            ("variance.fixed_waves", self.variance.fixed_waves),
            ("sampler.pool_factor", self.sampler.pool_factor),
        ]:
            if int(value) < 1:
                raise UserError(f"{name} must be at least 1, got {value}")
        if not r.epsilon > 0 or not r.deadline_s > 0 or r.over_select < 0:
            raise UserError("run.epsilon and run.deadline_s must be positive and run.over_select non-negative")
        if self.server.silent_after_beats != 0 and not self.server.silent_after_beats >= 1:
            raise UserError(
                f"server.silent_after_beats must be 0 (off) or at least 1, got {self.server.silent_after_beats}"
            )
        for name in ("outlier", "client_rms", "loss_outlier"):
            value = getattr(self.aggregation, name)
            if value != 0 and not value >= 1:
                raise UserError(f"aggregation.{name} must be 0 (off) or at least 1, got {value}")
        if r.steps >= 1 << 32:
            raise UserError("run.steps must be below 2^32 (seeds give the step 32 bits)")
        self.optimizer.check()

    def to_json(self) -> dict:
        return {f.name: vars(getattr(self, f.name)) for f in fields(self)}


def _choice(name: str, value, allowed) -> None:
    allowed = [str(a) for a in allowed]
    if value not in allowed:
        raise UserError(f"{name} is {value!r}; use one of {list(allowed)}")


def _check_type(name: str, default, value) -> None:
    """The value must have the default's type (an int is fine where a float is expected)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, want = number and isinstance(value, int), "an integer"
    elif isinstance(default, float) or default is None:
        ok, want = number or (default is None and value is None), "a number"
    elif isinstance(default, str):
        ok, want = isinstance(value, str), "a string"
    else:
        ok, want = isinstance(value, type(default)), type(default).__name__
    if not ok:
        raise UserError(f"config key {name} must be {want}, got {value!r}")


def from_dict(data: dict) -> CoordinatorConfig:
    cfg = CoordinatorConfig()
    sections = {f.name for f in fields(cfg)}
    for section, values in data.items():
        if section not in sections:
            raise UserError(f"unknown config section [{section}]; sections are {sorted(sections)}")
        target = getattr(cfg, section)
        known = {f.name for f in fields(target)}
        if not isinstance(values, dict):
            raise UserError(f"config section [{section}] must be a table of keys")
        for key, value in values.items():
            if key not in known:
                raise UserError(f"unknown config key {section}.{key}; [{section}] has {sorted(known)}")
            _check_type(f"{section}.{key}", getattr(target, key), value)
            setattr(target, key, value)
    cfg.check()
    return cfg


def load_config(path: str | Path | None) -> CoordinatorConfig:
    """Read a TOML (``.toml``) or JSON file; None gives the defaults."""
    if path is None:
        cfg = CoordinatorConfig()
        cfg.check()
        return cfg
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(
            f"config file {path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {exc}"
        ) from exc
    return from_dict(data)
