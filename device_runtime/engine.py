"""The forward-gradient engine: one directional derivative per seed, with inference only.

For each seed the perturbation v is regenerated locally (proto/PERTURBATION.md) and the
loss is evaluated at θ ± εv. Seeds are processed in groups that fill one backend call
(the graph's perturbation axis holds both signs of a group), so at most one group's
perturbations are ever in memory.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fwdllm.device_runtime.backend import Backend, Batch
from fwdllm.errors import UserError
from fwdllm.proto.names import DifferenceScheme, Distribution
from fwdllm.proto.perturbation import generate


class EngineError(UserError):
    """A task the engine cannot compute as asked (bad ε, scheme, seeds or θ)."""


class Cancelled(Exception):
    """The coordinator no longer needs this task; raised between backend calls."""


@dataclass
class GradientResult:
    """jvp[i] belongs to seeds[i]; entries listed in ``nonfinite`` are 0 and must be ignored."""

    seeds: list[int]
    jvp: np.ndarray  # float32 [n]
    nonfinite: list[int]
    loss_mean: float
    loss_min: float
    loss_max: float
    loss_base: float  # f(θ) for the forward scheme, else NaN
    evaluations: int  # θ rows evaluated
    calls: int  # backend calls
    seconds: float


def group_size(backend: Backend, scheme: DifferenceScheme | str, requested: int | None = None) -> int:
    """Seeds per backend call: ``requested``, else as many as fill the backend's rows per call."""
    if requested:
        return max(1, int(requested))
    return max(1, backend.rows_per_call // rows_per_seed(scheme))


def rows_per_seed(scheme: DifferenceScheme | str) -> int:
    """θ rows one seed takes in a backend call: θ + εv and θ − εv (central), or θ + εv (forward)."""
    return 2 if scheme == DifferenceScheme.CENTRAL else 1


def perturbed_rows(
    theta: np.ndarray,
    seeds: list[int],
    epsilon: float,
    scheme: DifferenceScheme | str = DifferenceScheme.CENTRAL,
    distribution: Distribution | str = Distribution.GAUSSIAN,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """The θ rows one backend call evaluates for ``seeds``: rows ``[0, k)`` are θ + ε·v(seed_j), and for the
    central scheme rows ``[k, 2k)`` θ − ε·v(seed_j). ``out`` (at least that many rows) is filled instead of a
    new array, so a task reuses one buffer for all its groups."""
    k, dist, eps = len(seeds), Distribution(distribution), np.float32(epsilon)
    n_rows = rows_per_seed(scheme) * k
    rows = np.empty((n_rows, theta.shape[0]), dtype=np.float32) if out is None else out[:n_rows]
    for j, seed in enumerate(seeds):
        v = generate(int(seed), 0, theta.shape[0], dist)
        np.multiply(v, eps, out=v)
        np.add(theta, v, out=rows[j])
        if scheme == DifferenceScheme.CENTRAL:
            np.subtract(theta, v, out=rows[k + j])
    return rows


def forward_gradients(
    backend: Backend,
    batch: Batch,
    theta: np.ndarray,
    seeds: list[int],
    epsilon: float = 0.01,
    scheme: DifferenceScheme | str = DifferenceScheme.CENTRAL,
    distribution: Distribution | str = Distribution.GAUSSIAN,
    max_seeds: int | None = None,
    group: int | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> GradientResult:
    """jvp_i ≈ ∇f(θ)·v(seed_i) by central, (f(θ+εv)−f(θ−εv))/2ε, or forward, (f(θ+εv)−f(θ))/ε, differences."""
    started = time.perf_counter()
    theta = _check(backend, theta, seeds, epsilon, scheme, distribution, max_seeds)
    dist, d = Distribution(distribution), theta.shape[0]
    seeds = [int(s) for s in seeds]
    g = group_size(backend, scheme, group)
    plus = np.empty(len(seeds), dtype=np.float32)
    minus = np.empty(len(seeds), dtype=np.float32)
    calls, base = 0, math.nan
    if scheme == DifferenceScheme.FORWARD:
        base = float(backend.losses(batch, theta[None])[0])
        calls += 1
    rows = np.empty((rows_per_seed(scheme) * g, d), dtype=np.float32)
    for start in range(0, len(seeds), g):
        if should_stop is not None and should_stop():
            raise Cancelled()
        chunk = seeds[start : start + g]
        k = len(chunk)
        block = perturbed_rows(theta, chunk, epsilon, scheme, dist, out=rows)
        out = backend.losses(batch, block)
        calls += 1
        plus[start : start + k] = out[:k]
        if scheme == DifferenceScheme.CENTRAL:
            minus[start : start + k] = out[k:]
    return _result(seeds, plus, minus, base, epsilon, scheme, calls, time.perf_counter() - started)


def _check(backend, theta, seeds, epsilon, scheme, distribution, max_seeds) -> np.ndarray:
    if scheme not in tuple(DifferenceScheme):
        schemes = [s.value for s in DifferenceScheme]
        raise EngineError(f"unknown difference scheme {scheme!r}; choose one of {schemes}")
    try:
        Distribution(distribution)
    except ValueError:
        raise EngineError(
            f"unknown distribution {distribution!r}; choose one of {[d.value for d in Distribution]}"
        ) from None
    if not (isinstance(epsilon, (int, float, np.floating)) and math.isfinite(epsilon) and epsilon > 0):
        raise EngineError(f"epsilon must be a positive finite number, got {epsilon!r}")
    if not seeds:
        raise EngineError("a task needs at least one seed")
    if max_seeds is not None and len(seeds) > max_seeds:
        raise EngineError(f"the task has {len(seeds)} seeds but at most {max_seeds} are allowed")
    bad = [s for s in seeds if not (isinstance(s, (int, np.integer)) and 0 <= int(s) < 1 << 64)]
    if bad:
        raise EngineError(f"seeds must be unsigned 64-bit integers, got {bad[:3]}")
    theta = np.asarray(theta)
    if theta.ndim != 1 or theta.shape[0] != backend.theta_dim:
        raise EngineError(
            f"θ must be a vector of length {backend.theta_dim} for this bundle, got shape {list(theta.shape)}"
        )
    theta = np.ascontiguousarray(theta, dtype=np.float32)
    if not np.isfinite(theta).all():
        raise EngineError("θ contains NaN or Inf; fetch the parameters again")
    return theta


def _result(seeds, plus, minus, base, epsilon, scheme, calls, seconds) -> GradientResult:
    if scheme == DifferenceScheme.CENTRAL:
        ok = np.isfinite(plus) & np.isfinite(minus)
        jvp = (plus.astype(np.float64) - minus.astype(np.float64)) / (2.0 * epsilon)
        losses = np.concatenate([plus[ok], minus[ok]])
        evaluations = 2 * len(seeds)
    else:
        ok = np.isfinite(plus) & bool(np.isfinite(base))
        jvp = (plus.astype(np.float64) - base) / epsilon
        losses = plus[ok]
        evaluations = len(seeds) + 1
    ok &= np.isfinite(jvp)
    jvp = np.where(ok, jvp, 0.0).astype(np.float32)
    stats = (float(losses.mean()), float(losses.min()), float(losses.max())) if losses.size else (math.nan,) * 3
    return GradientResult(
        seeds=list(seeds),
        jvp=jvp,
        nonfinite=[int(i) for i in np.flatnonzero(~ok)],
        loss_mean=stats[0],
        loss_min=stats[1],
        loss_max=stats[2],
        loss_base=float(base),
        evaluations=evaluations,
        calls=calls,
        seconds=seconds,
    )
