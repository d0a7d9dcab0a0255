"""What a history row means: θ_{v+1} = θ_v − lr · Σ_i c_i · v(seed_i), written once for both roles.

This module is the definition of a history row (version, lr, seeds, coefficients, distribution).
Devices replay rows with it to rebuild θ without downloading it, and the coordinator computes
every replayable step's θ with it from the very row it records, so both ends hold the same θ bit
for bit. lr and the coefficients are float32, as the wire carries them; each element's sum runs
over the seeds in the row's order in float64, and θ is rounded to float32 once per row. Column
chunks only split the work, so the chunk size and thread count never change a bit. numpy and the
perturbation generator only, so a phone runs it as is.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from fwdllm.proto.names import Distribution
from fwdllm.proto.perturbation import generate

DEFAULT_CHUNK = 1 << 14


def seeded_sum(
    seeds: Sequence[int] | np.ndarray,
    coefficients: Sequence[float] | np.ndarray,
    dim: int,
    distribution: Distribution | str = Distribution.GAUSSIAN,
    *,
    chunk: int = DEFAULT_CHUNK,
    threads: int = 1,
) -> np.ndarray:
    """Σ_i c_i · v(seed_i), float64 [dim]; column chunks run on ``threads`` threads (generation releases the GIL)."""
    seeds = [int(s) for s in seeds]
    coefficients = np.asarray(coefficients, dtype=np.float32).reshape(-1).astype(np.float64)
    if coefficients.size != len(seeds):
        raise ValueError(f"{coefficients.size} coefficients for {len(seeds)} seeds")
    dist, total = Distribution(distribution), np.zeros(dim, dtype=np.float64)

    def columns(start: int) -> None:
        acc = total[start : start + chunk]
        term = np.empty_like(acc)
        for seed, c in zip(seeds, coefficients):
            np.multiply(generate(seed, start, acc.size, dist), c, out=term, dtype=np.float64)
            acc += term

    starts = range(0, dim, chunk) if seeds else range(0)
    if threads <= 1 or len(starts) <= 1:
        for start in starts:
            columns(start)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(columns, starts))
    return total


def step(theta: np.ndarray, total: np.ndarray, lr: float) -> np.ndarray:
    """θ − lr · ``total`` (a ``seeded_sum``), rounded to float32."""
    return (np.asarray(theta, dtype=np.float64) - np.float64(np.float32(lr)) * total).astype(np.float32)


def apply_update(
    theta: np.ndarray,
    seeds: Sequence[int] | np.ndarray,
    coefficients: Sequence[float] | np.ndarray,
    lr: float,
    distribution: Distribution | str = Distribution.GAUSSIAN,
) -> np.ndarray:
    """θ after one history row; float32."""
    return step(theta, seeded_sum(seeds, coefficients, theta.shape[0], distribution), lr)
