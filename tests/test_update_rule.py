"""proto/update_rule.py: what a history row means, against a dense recomputation."""

import numpy as np

from fwdllm.proto.perturbation import generate
from fwdllm.proto.update_rule import apply_update, seeded_sum, step


def test_replayed_update_is_theta_minus_lr_times_the_seeded_sum():
    d, seeds, coefficients, lr = 257, [3, 11, 2**63 + 5], [0.5, -1.25, 2.0], 0.03
    theta = np.linspace(-1, 1, d, dtype=np.float32)
    want = theta.astype(np.float64) - np.float64(np.float32(lr)) * sum(
        c * generate(s, 0, d, "rademacher").astype(np.float64) for s, c in zip(seeds, coefficients)
    )
    got = apply_update(theta, seeds, coefficients, lr, "rademacher")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want.astype(np.float32))


def test_chunks_and_threads_change_no_bit():
    d, seeds = 1000, [7, 2**40 + 1, 5, 99]
    coefficients = np.array([0.1, -3.5, 2.25e-3, 1.0], dtype=np.float32)
    whole = seeded_sum(seeds, coefficients, d)
    np.testing.assert_array_equal(seeded_sum(seeds, coefficients, d, chunk=97, threads=3), whole)
    theta = np.linspace(-1, 1, d, dtype=np.float32)
    np.testing.assert_array_equal(step(theta, whole, 0.01), apply_update(theta, seeds, coefficients, 0.01))


def test_no_seeds_leave_theta_as_it_was():
    theta = np.arange(5, dtype=np.float32)
    np.testing.assert_array_equal(apply_update(theta, [], [], 0.1), theta)
