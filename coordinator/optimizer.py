"""The server optimiser on theta: SGD (FwdLLM's linear decay), momentum or Adam, plus stabilisers.

A forward-gradient estimate's variance grows with the dimension d, so a long BitFit run can
blow up (COORDINATOR.md, "Training recipes"). The options here are the measured remedies: a decaying
schedule, clipping or normalising the estimate's global norm, a learning rate per tensor
group (e.g. head vs biases, matched on manifest tensor names) and Adam. The optimiser state
is a dict of float32 arrays so checkpoints keep it.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import numpy as np

from fwdllm.errors import UserError
from fwdllm.proto.manifest import ThetaLayout

OPTIMIZERS = ("sgd", "momentum", "adam")
SCHEDULES = ("linear", "constant", "cosine")


@dataclass
class OptimizerConfig:
    name: str = "sgd"
    lr: float = 0.01
    schedule: str = "linear"  # FwdLLM: lr_t = lr * (T - t) / T
    warmup_steps: int = 0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_norm: float | None = None  # scale the estimate down to this global L2 norm when above it
    normalize: bool = False  # scale the estimate to unit global norm (then lr is the step length)
    # FZOO (2025): divide the estimate by the spread (std) of the step's directional derivatives. For
    # jvp_i = g·v_i with v ~ N(0, I) that spread is |g|, so the step length is ~lr whatever the gradient's
    # scale, without the noise of the estimate's own norm (which grows as sqrt(d / perturbations) |g|).
    jvp_std: bool = False
    groups: list[dict] = field(default_factory=list)  # [{"match": "*.bias", "lr_scale": 0.1}], first match wins

    def check(self) -> None:
        if self.name not in OPTIMIZERS:
            raise UserError(f"optimizer.name {self.name!r} is unknown; use one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"optimizer.schedule {self.schedule!r} is unknown; use one of {SCHEDULES}")
        if not self.lr > 0:
            raise UserError(f"optimizer.lr must be positive, got {self.lr}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise UserError(f"optimizer.clip_norm must be positive or absent, got {self.clip_norm}")
        for g in self.groups:
            if set(g) != {"match", "lr_scale"}:
                raise UserError(f"optimizer.groups entries need exactly 'match' and 'lr_scale', got {sorted(g)}")


def learning_rate(cfg: OptimizerConfig, step: int, total_steps: int) -> float:
    """The learning rate of 0-based ``step`` in a run of ``total_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    frac = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    if cfg.schedule == "linear":
        return cfg.lr * max(0.0, 1.0 - frac)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))


def lr_scales(cfg: OptimizerConfig, layout: ThetaLayout) -> np.ndarray | None:
    """Per-element learning-rate multipliers from ``groups`` (None when every scale is 1)."""
    if not cfg.groups:
        return None
    scales = np.ones(layout.dim, dtype=np.float32)
    unmatched = [
        g["match"] for g in cfg.groups if not any(fnmatch.fnmatchcase(s.name, g["match"]) for s in layout.tensors)
    ]
    if unmatched:
        names = [s.name for s in layout.tensors][:8]
        raise UserError(f"optimizer.groups patterns {unmatched} match no theta tensor; tensors look like {names}")
    for slot in layout.tensors:
        for g in cfg.groups:
            if fnmatch.fnmatchcase(slot.name, g["match"]):
                scales[slot.offset : slot.offset + slot.size] = float(g["lr_scale"])
                break
    return scales


class Optimizer:
    """Applies gradient estimates to theta; ``state`` holds what checkpoints must keep."""

    def __init__(self, cfg: OptimizerConfig, layout: ThetaLayout, total_steps: int):
        cfg.check()
        self.cfg, self.total_steps = cfg, total_steps
        self.scales = lr_scales(cfg, layout)
        self.state: dict[str, np.ndarray] = {}
        if cfg.name == "momentum":
            self.state["momentum"] = np.zeros(layout.dim, dtype=np.float32)
        if cfg.name == "adam":
            self.state["adam_m"] = np.zeros(layout.dim, dtype=np.float32)
            self.state["adam_v"] = np.zeros(layout.dim, dtype=np.float32)
            self.state["adam_t"] = np.zeros(1, dtype=np.float32)

    @property
    def replayable(self) -> bool:
        """Whether theta[t+1] = theta[t] - lr * scale * g holds, so devices can replay history."""
        return self.cfg.name == "sgd" and self.scales is None

    def gradient_scale(self, norm: float, jvp_std: float = math.nan) -> float:
        """The factor clipping or normalisation applies to an estimate of this global norm (and, with
        ``jvp_std`` on, of this spread of directional derivatives)."""
        if not math.isfinite(norm) or norm == 0.0:
            return 1.0 if norm == 0.0 else 0.0
        if self.cfg.jvp_std:
            return 1.0 / jvp_std if math.isfinite(jvp_std) and jvp_std > 0 else 0.0
        if self.cfg.normalize:
            return 1.0 / norm
        if self.cfg.clip_norm is not None and norm > self.cfg.clip_norm:
            return self.cfg.clip_norm / norm
        return 1.0

    def plan(self, grad: np.ndarray, step: int, jvp_std: float = math.nan) -> dict:
        """lr, grad_norm and the scale a step on ``grad`` applies; a replayable step is θ - lr * scale * grad.

        ``jvp_std``: the std of the directional derivatives ``grad`` was built from (``jvp_std`` option)."""
        norm = float(np.linalg.norm(grad.astype(np.float64)))
        lr = learning_rate(self.cfg, step, self.total_steps)
        return {"lr": lr, "grad_norm": norm, "grad_scale": self.gradient_scale(norm, jvp_std)}

    def apply(
        self, theta: np.ndarray, grad: np.ndarray, step: int, jvp_std: float = math.nan
    ) -> tuple[np.ndarray, dict]:
        """theta after one step on ``grad``, and its ``plan``."""
        info = self.plan(grad, step, jvp_std)
        g = grad * np.float32(info["grad_scale"])
        if self.cfg.name == "momentum":
            buf = self.state["momentum"]
            buf *= np.float32(self.cfg.momentum)
            buf += g
            update = buf
        elif self.cfg.name == "adam":
            m, v, t = self.state["adam_m"], self.state["adam_v"], self.state["adam_t"]
            t += 1
            m *= np.float32(self.cfg.beta1)
            m += np.float32(1 - self.cfg.beta1) * g
            v *= np.float32(self.cfg.beta2)
            v += np.float32(1 - self.cfg.beta2) * g * g
            m_hat = m / np.float32(1 - self.cfg.beta1 ** float(t[0]))
            v_hat = v / np.float32(1 - self.cfg.beta2 ** float(t[0]))
            update = m_hat / (np.sqrt(v_hat) + np.float32(self.cfg.adam_eps))
        else:
            update = g
        step_vec = np.float32(info["lr"]) * update
        if self.scales is not None:
            step_vec = step_vec * self.scales
        return (theta - step_vec).astype(np.float32), info

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        missing = sorted(set(self.state) - set(state))
        if missing:
            raise UserError(
                f"the checkpoint lacks optimiser state {missing}: it was written with another "
                "optimizer.name; keep the run's config or start a new --state folder"
            )
        for k in self.state:
            self.state[k] = np.array(state[k], dtype=np.float32)
