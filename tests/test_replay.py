"""device_runtime/replay.py: the SGD update a device replays, against a dense recomputation."""

import numpy as np

from fwdllm.device_runtime.replay import apply_update
from fwdllm.proto.perturbation import generate


def test_replayed_update_is_theta_minus_lr_times_the_seeded_sum():
    d, seeds, coefficients, lr = 257, [3, 11, 2**63 + 5], [0.5, -1.25, 2.0], 0.03
    theta = np.linspace(-1, 1, d, dtype=np.float32)
    want = theta.astype(np.float64) - lr * sum(
        c * generate(s, 0, d, "rademacher").astype(np.float64) for s, c in zip(seeds, coefficients)
    )
    got = apply_update(theta, seeds, coefficients, lr, "rademacher")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want.astype(np.float32))


def test_no_seeds_leave_theta_as_it_was():
    theta = np.arange(5, dtype=np.float32)
    np.testing.assert_array_equal(apply_update(theta, [], [], 0.1), theta)
