"""The SGD update rule as a device replays it: θ_{v+1} = θ_v − lr · Σ_i c_i · v(seed_i).

The coordinator keeps, per replayable version, the learning rate and one coefficient per seed
(the jvp over the step's seed count, times any clipping scale), so applying them here rebuilds θ
without downloading it. Sums run in float64 and each version is rounded to float32, as the
coordinator stores it. numpy and the perturbation generator only, so a phone can run it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fwdllm.proto.perturbation import Distribution, generate


def apply_update(
    theta: np.ndarray,
    seeds: Sequence[int],
    coefficients: Sequence[float],
    lr: float,
    distribution: Distribution | str = Distribution.GAUSSIAN,
) -> np.ndarray:
    """θ after one update; float32."""
    d = theta.shape[0]
    step = np.zeros(d, dtype=np.float64)
    for seed, coeff in zip(seeds, coefficients):
        step += np.float64(coeff) * generate(int(seed), 0, d, distribution)
    return (theta.astype(np.float64) - np.float64(lr) * step).astype(np.float32)
