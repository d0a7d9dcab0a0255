"""The perturbation generator against an independent scalar implementation and committed known answers."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import reference_philox as ref

from fwdllm.proto import perturbation as pt

KNOWN_ANSWERS = Path(pt.__file__).with_name("known_answers.json")  # spec v1's distributions
KNOWN_ANSWERS_V2 = KNOWN_ANSWERS.with_name("known_answers_v2.json")  # v2's sparse Gaussians
SPARSE = list(ref.SPARSE_DENSITIES)


def ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance in float32 representable steps (both arrays finite, same sign region)."""
    ai = a.astype(np.float32).view(np.int32).astype(np.int64)
    bi = b.astype(np.float32).view(np.int32).astype(np.int64)
    ai = np.where(ai < 0, np.int64(-(2**31)) - ai, ai)
    bi = np.where(bi < 0, np.int64(-(2**31)) - bi, bi)
    return np.abs(ai - bi)


@pytest.mark.parametrize("counter,key,expected", ref.RANDOM123_KAT)
def test_reference_matches_random123(counter, key, expected):
    assert ref.philox4x64_10(counter, key) == expected


@pytest.mark.parametrize("seed,first", [(0, 0), (3, 1), (2**64 - 1, 2**64 - 2), (99, 2**70 + 5)])
def test_raw_blocks_match_reference(seed, first):
    blocks = pt._raw_blocks(seed, first, 3)
    for j in range(3):
        assert blocks[j].tolist() == ref.block(seed, first + j)


@pytest.mark.parametrize(
    "case",
    [c for path in (KNOWN_ANSWERS, KNOWN_ANSWERS_V2) for c in json.loads(path.read_text())["cases"]],
    ids=lambda c: f"{c['dist']}-{c['seed']}-{c['offset']}",
)
def test_known_answers(case):
    got = pt.generate(int(case["seed"]), case["offset"], len(case["values"]), case["dist"])
    expected = np.array(case["values"], dtype=np.float32)
    if case["dist"] == "rademacher":
        assert got.tobytes() == expected.tobytes()
    else:
        assert ulp_distance(got, expected).max() <= 1
        assert got.tobytes() == expected.tobytes(), "bit-exact on x86-64 with glibc/numpy float64 math"


def test_known_answers_files_are_what_the_reference_writes():
    assert json.loads(KNOWN_ANSWERS.read_text()) == json.loads(json.dumps(ref.known_answers()))
    assert json.loads(KNOWN_ANSWERS_V2.read_text()) == json.loads(json.dumps(ref.known_answers_v2()))


@pytest.mark.parametrize("dist", ["gaussian", "rademacher", *SPARSE])
def test_any_slice_equals_the_same_slice_of_the_whole(dist):
    whole = pt.generate(7, 0, 5000, dist)
    for offset, count in [(0, 1), (1, 7), (7, 9), (255, 258), (1000, 3999), (4999, 1)]:
        np.testing.assert_array_equal(pt.generate(7, offset, count, dist), whole[offset : offset + count])
    chunks = np.concatenate([v for _, v in pt.iter_chunks(7, 5000, 333, dist)])
    np.testing.assert_array_equal(chunks, whole)


def test_gaussian_scalar_reference_on_many_values():
    seed = pt.seed_for(12, 345)
    got = pt.generate(seed, 777, 400)
    expected = np.array([ref.gaussian(seed, 777 + j) for j in range(400)], dtype=np.float32)
    assert ulp_distance(got, expected).max() <= 1


@pytest.mark.parametrize("dist", SPARSE)
def test_sparse_scalar_reference_on_many_values(dist):
    seed = pt.seed_for(12, 345)
    got = pt.generate(seed, 777, 3000, dist)
    expected = np.array([ref.sparse_gaussian(seed, 777 + j, ref.SPARSE_DENSITIES[dist]) for j in range(3000)])
    assert np.count_nonzero(expected) > 10
    assert got.tobytes() == expected.astype(np.float32).tobytes()


@pytest.mark.parametrize("dist", SPARSE)
def test_sparse_moments_and_support(dist):
    density = ref.SPARSE_DENSITIES[dist]
    v = pt.generate(2024, 0, 1_000_000, dist).astype(np.float64)
    kept = v != 0
    assert abs(kept.mean() - density) < 4 * np.sqrt(density / 1e6)
    # E[v vᵀ] = I on the diagonal, within 5 standard errors (Var v² = E[v⁴] − 1 = 3/ρ − 1)
    assert abs(np.mean(v**2) - 1) < 5 * np.sqrt((3 / density - 1) / 1e6) and abs(v.mean()) < 0.01
    # the kept values are the dense Gaussian's, scaled
    scaled = pt.generate(2024, 0, 1_000_000)[kept] * np.sqrt(1 / density)
    np.testing.assert_array_equal(v[kept], scaled.astype(np.float32))
    # the keep decisions are independent of the values: |g| has the same mean on kept and dropped elements
    g = np.abs(pt.generate(2024, 0, 1_000_000))
    assert abs(g[kept].mean() - g[~kept].mean()) < 0.03


def test_distribution_moments():
    g = pt.generate(2024, 0, 1_000_000)
    assert g.dtype == np.float32
    assert abs(g.mean()) < 0.005 and abs(g.var() - 1) < 0.005
    assert abs(np.mean(g**4) - 3) < 0.05  # kurtosis of a normal
    r = pt.generate(2024, 0, 1_000_000, "rademacher")
    assert set(np.unique(r).tolist()) == {-1.0, 1.0} and abs(r.mean()) < 0.005


def test_different_seeds_are_uncorrelated():
    a, b = pt.generate(pt.seed_for(1, 0), 0, 200_000), pt.generate(pt.seed_for(1, 1), 0, 200_000)
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.01


def test_seed_derivation_is_injective_and_bounded():
    assert pt.seed_for(0, 0) == 0 and pt.seed_for(1, 0) == 1 << 32 and pt.seed_for(2**32 - 1, 2**32 - 1) == 2**64 - 1
    with pytest.raises(ValueError):
        pt.seed_for(2**32, 0)
    with pytest.raises(ValueError):
        pt.generate(-1, 0, 1)


def test_cli_prints_spec_values():
    out = subprocess.run(
        [sys.executable, "-m", "fwdllm.cli", "perturb", "--seed", "0x2a", "--offset", "5", "--count", "11", "--json"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    doc = json.loads(out)
    np.testing.assert_array_equal(np.array(doc["values"], dtype=np.float32), pt.generate(42, 5, 11))
    assert doc["bits"][0] == ref.bits(float(pt.generate(42, 5, 1)[0]))
    assert doc["spec_version"] == 2


def test_cli_prints_sparse_values():
    argv = ["perturb", "--seed", "42", "--count", "64", "--dist", "sparse-gaussian-0.1", "--json"]
    doc = json.loads(
        subprocess.run([sys.executable, "-m", "fwdllm.cli", *argv], check=True, capture_output=True, text=True).stdout
    )
    expected = [ref.sparse_gaussian(42, j, 0.1) for j in range(64)]
    assert doc["values"] == expected and doc["dist"] == "sparse-gaussian-0.1" and any(expected)


def test_cli_rejects_bad_seed():
    proc = subprocess.run(
        [sys.executable, "-m", "fwdllm.cli", "perturb", "--seed", "-3"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "unsigned 64-bit" in proc.stderr
