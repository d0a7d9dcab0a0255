"""Aggregation of seed-encoded scalars against a direct dense sum over materialised perturbations."""

import numpy as np
import pytest

from fwdllm.coordinator.aggregation import SeedMatrix, aggregate, clean, split_half_variance
from fwdllm.proto.perturbation import generate, seed_for


def dense(seeds, dim, dist="gaussian"):
    return np.stack([generate(int(s), 0, dim, dist) for s in seeds]).astype(np.float64)


@pytest.mark.parametrize("dist", ["gaussian", "rademacher", "sparse-gaussian-0.1"])
@pytest.mark.parametrize("chunk,threads", [(1000, 1), (333, 3), (1 << 15, 2)])
def test_aggregate_equals_dense_sum(dist, chunk, threads):
    rng = np.random.default_rng(0)
    dim, n = 2_345, 150
    seeds = [seed_for(3, i) for i in rng.permutation(10_000)[:n]]
    jvp = rng.normal(size=n).astype(np.float32)
    scalars = clean([(seeds[:70], jvp[:70]), (seeds[70:], jvp[70:])], clip=None)
    got = aggregate(scalars, dim, dist, chunk=chunk, threads=threads)
    want = jvp.astype(np.float64) @ dense(seeds, dim, dist) / n
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max() + 1e-6)


def test_result_is_bitwise_independent_of_arrival_order_and_threads():
    rng = np.random.default_rng(1)
    seeds = rng.integers(0, 2**63, size=200, dtype=np.uint64)
    jvp = rng.normal(size=200).astype(np.float32)
    a = aggregate(clean([(seeds, jvp)], None), 5_000, "gaussian", chunk=700, threads=1)
    perm = rng.permutation(200)
    b = aggregate(
        clean([(seeds[perm][:50], jvp[perm][:50]), (seeds[perm][50:], jvp[perm][50:])], None),
        5_000,
        "gaussian",
        chunk=700,
        threads=4,
    )
    assert a.tobytes() == b.tobytes()


def test_nonfinite_are_dropped_and_counted_and_scalars_clipped():
    seeds = [seed_for(0, i) for i in range(5)]
    jvp = np.array([1.0, np.nan, 50.0, -np.inf, -2.0], dtype=np.float32)
    scalars = clean([(seeds, jvp)], clip=10.0)
    assert scalars.dropped_nonfinite == 2 and scalars.clipped == 1
    got = aggregate(scalars, 300, "gaussian")
    kept = [seeds[0], seeds[2], seeds[4]]
    want = np.array([1.0, 10.0, -2.0]) @ dense(kept, 300) / 3
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_duplicate_seed_in_one_step_is_refused():
    with pytest.raises(ValueError, match="twice"):
        clean([([1, 2], [0.1, 0.2]), ([2], [0.3])], None)


def test_median_and_trimmed_mean_match_per_client_dense_estimates():
    rng = np.random.default_rng(2)
    dim, clients = 400, 7
    contributions, estimates = [], []
    for c in range(clients):
        seeds = [seed_for(1, 10 * c + i) for i in range(3)]
        jvp = rng.normal(size=3).astype(np.float32) * (100.0 if c == 0 else 1.0)  # client 0 is an outlier
        contributions.append((seeds, jvp))
        estimates.append(jvp.astype(np.float64) @ dense(seeds, dim) / 3)
    estimates = np.stack(estimates)
    scalars = clean(contributions, None)
    np.testing.assert_allclose(
        aggregate(scalars, dim, "gaussian", method="median", chunk=128), np.median(estimates, axis=0), atol=1e-5
    )
    trimmed = np.sort(estimates, axis=0)[1:-1].mean(axis=0)
    np.testing.assert_allclose(
        aggregate(scalars, dim, "gaussian", method="trimmed", trim=0.15, chunk=128), trimmed, atol=1e-5
    )


def test_a_result_larger_than_its_peers_is_scaled_to_the_client_rms_bound():
    rng = np.random.default_rng(5)
    honest = [(list(range(10 * c, 10 * c + 10)), rng.normal(size=10).astype(np.float32)) for c in range(4)]
    loud = (list(range(100, 110)), np.where(np.arange(10) % 2 == 0, 7.0, -7.0).astype(np.float32))
    rms = [float(np.sqrt(np.mean(np.square(j, dtype=np.float64)))) for _, j in [*honest, loud]]
    bound = 2.0 * float(np.median(rms))  # independent: the bound as the docstring defines it
    scalars = clean([*honest, loud], None, client_rms=2.0)
    got = scalars.jvp[scalars.clients == 4]
    np.testing.assert_allclose(np.sqrt(np.mean(np.square(got, dtype=np.float64))), bound, rtol=1e-6)
    np.testing.assert_allclose(got, loud[1] * np.float32(bound / 7.0), rtol=1e-6)  # signs and ratios kept
    for c, (_, jvp) in enumerate(honest):  # within the bound: untouched
        np.testing.assert_array_equal(scalars.jvp[scalars.clients == c], jvp[np.argsort(honest[c][0])])
    assert scalars.clipped == 10
    assert clean([*honest, loud], None).clipped == 0  # off by default


@pytest.mark.parametrize("dist", ["gaussian", "sparse-gaussian-0.1"])
def test_split_half_variance_matches_dense_halves_and_shrinks_with_more_scalars(dist):
    rng = np.random.default_rng(3)
    dim, grad = 600, rng.normal(size=600)
    seeds = np.array([seed_for(0, i) for i in range(64)], dtype=np.uint64)
    v = dense(seeds, dim, dist)
    jvp = (v @ grad).astype(np.float32)
    scalars = clean([(seeds, jvp)], None)
    got = split_half_variance(scalars, dim, dist, 100, 300)
    contrib = jvp[:, None].astype(np.float64) * v[:, 100:300]
    m1, m2 = contrib[0::2].mean(axis=0), contrib[1::2].mean(axis=0)
    assert got == pytest.approx(np.mean((m1 - m2) ** 2 / 2), rel=1e-4)
    small = split_half_variance(clean([(seeds[:8], jvp[:8])], None), dim, dist, 0, dim)
    large = split_half_variance(scalars, dim, dist, 0, dim)
    assert large < small


@pytest.mark.parametrize("dist", ["gaussian", "sparse-gaussian-0.1"])
def test_matvec_gives_dots_and_squared_norms(dist):
    seeds = [seed_for(2, i) for i in range(9)]
    x = np.random.default_rng(4).normal(size=1000).astype(np.float32)
    dots, sq = SeedMatrix(seeds, 1000, dist, chunk=300, seed_group=4, threads=2).matvec(x)
    v = dense(seeds, 1000, dist)
    np.testing.assert_allclose(dots, v @ x, rtol=1e-5)
    np.testing.assert_allclose(sq, (v * v).sum(axis=1), rtol=1e-5)
