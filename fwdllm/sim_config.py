"""The settings of a simulated federated run, shared by `fwdllm simulate` and the in-process simulator."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fwdllm.device_runtime.backend import DEFAULT_BACKEND
from fwdllm.errors import UserError
from fwdllm.proto.names import VarianceMode

ENGINES = ("processes", "flower")


@dataclass
class SimConfig:
    bundle: str
    data: str
    clients: int = 100
    per_step: int = 10
    steps: int = 100
    workers: int = 2  # device processes; each hosts clients / workers virtual clients
    backend: str = DEFAULT_BACKEND
    perturbations: int = 1  # seeds per client per task
    batch_size: int = 8
    epsilon: float = 0.01
    optimizer: str = "sgd"
    lr: float = 0.01
    schedule: str = "linear"
    clip_norm: float | None = None
    variance: VarianceMode = VarianceMode.OFF  # the coordinator's variance control
    max_waves: int = 8
    sampler: bool = False
    alpha: float | None = 0.5  # Dirichlet label skew; None: IID
    seed: int = 0
    eval_every: int = 10
    eval_limit: int = 0  # held-out examples evaluated; 0: all
    deadline_s: float = 120.0
    init_theta: str | None = None  # θ file of an earlier run to start from (matching tensors by name)
    engine: str = "processes"  # processes (coordinator and worker processes) | flower (Flower's Simulation Engine)
    ray_address: str | None = None  # engine flower: an existing Ray cluster (default: a local Ray instance)
    client_cpus: float = 1.0  # engine flower: CPUs Ray reserves per running ClientApp

    def check(self) -> None:
        if not 1 <= self.per_step <= self.clients:
            raise UserError(f"--per-step must lie in 1..--clients ({self.clients}), got {self.per_step}")
        if not 1 <= self.workers <= self.clients:
            raise UserError(f"--workers must lie in 1..--clients ({self.clients}), got {self.workers}")
        for name in ("steps", "perturbations", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.engine not in ENGINES:
            raise UserError(f"--engine {self.engine!r} is not one of {list(ENGINES)}")
        if self.client_cpus <= 0:
            raise UserError(f"--client-cpus must be positive, got {self.client_cpus}")
        from fwdllm.device_runtime.backend import BACKENDS

        backends = sorted(BACKENDS)
        if self.backend not in backends:
            raise UserError(f"--backend {self.backend!r} is not one of {backends}")
        if self.init_theta and not Path(self.init_theta).is_file():
            raise UserError(f"--init-theta {self.init_theta} does not exist; give an earlier run's theta.safetensors")
        if not Path(self.bundle, "manifest.json").is_file():
            raise UserError(
                f"--bundle {self.bundle} is not a bundle (no manifest.json); create one with `fwdllm export`"
            )

    def coordinator_config(self, heldout: Path) -> dict:
        """The coordinator's settings for this simulation (see coordinator/config.py)."""
        optimizer = {"name": self.optimizer, "lr": self.lr, "schedule": self.schedule}
        if self.clip_norm is not None:
            optimizer["clip_norm"] = self.clip_norm
        return {
            # Exactly per_step tasks per wave, all awaited: results, and so θ, depend on the seeds alone.
            "run": {
                "steps": self.steps,
                "clients_per_step": self.per_step,
                "perturbations_per_client": self.perturbations,
                "over_select": 0.0,
                "min_clients": self.clients,
                "min_results": self.per_step,
                "batch_size": self.batch_size,
                "epsilon": self.epsilon,
                "seed": self.seed,
                "deadline_s": self.deadline_s,
                "init_theta": str(self.init_theta or ""),
            },
            "optimizer": optimizer,
            "variance": {"mode": self.variance, "max_waves": self.max_waves},
            "sampler": {"enabled": self.sampler},
            # Hundreds of idle virtual clients poll: 1 s between pulls keeps that below a tenth of a core.
            "server": {"heartbeat_ms": 3000, "retry_ms": 1000, "rate_per_s": 100.0, "rate_burst": 200},
            "eval": {"every": self.eval_every, "data": str(heldout), "backend": self.backend, "limit": self.eval_limit},
        }
