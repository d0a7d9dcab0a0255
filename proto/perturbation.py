"""The seeded perturbation generator that device and coordinator share (spec: PERTURBATION.md).

A perturbation is never sent over the wire: both ends regenerate it from a 64-bit seed.
Any slice ``[offset, offset + count)`` of a perturbation can be generated on its own, so
the coordinator streams long vectors in chunks and a device never holds more than it uses.

This is the numpy implementation of spec version 2 (version 1's distributions plus the sparse
Gaussians; version 1's values are unchanged). It drives numpy's C implementation of
Philox4x64-10 for the raw bits only (the raw stream is the published algorithm, checked
against Random123's known answers in the tests); every transform on top of the bits is
written out here, so nothing depends on numpy's ``Generator`` distributions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import numpy as np

from fwdllm.proto.names import Distribution

SPEC_VERSION = 2

#: Values produced by one Philox block (4 words of 64 bits) for each distribution.
GAUSSIAN_PER_BLOCK = 8
RADEMACHER_PER_BLOCK = 256

_TWO_POW_M32 = 2.0**-32
_TWO_PI_TWO_POW_M32 = 2.0 * np.pi * 2.0**-32
_CHUNK_WORDS = 1 << 13
_COUNTER_SPACE = 1 << 256


def _philox(seed: int, first_block: int, stream: int = 0) -> np.random.Philox:
    """Philox4x64-10 with key ``(seed, stream)`` positioned so its next output is block ``first_block``.

    numpy's bit generator increments its counter before each block, so it starts one early.
    """
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"seed must be an unsigned 64-bit integer, got {seed}")
    key = np.array([seed, stream], dtype=np.uint64)
    return np.random.Philox(counter=(first_block - 1) % _COUNTER_SPACE, key=key)


def _raw_blocks(seed: int, first_block: int, num_blocks: int) -> np.ndarray:
    """``uint64[num_blocks, 4]``: the words of blocks ``first_block .. first_block+num_blocks-1``."""
    return _philox(seed, first_block).random_raw(num_blocks * 4).reshape(num_blocks, 4)


def _gaussian(seed: int, offset: int, count: int) -> np.ndarray:
    first = offset // GAUSSIAN_PER_BLOCK
    num_words = ((offset + count - 1) // GAUSSIAN_PER_BLOCK - first + 1) * 4
    bitgen = _philox(seed, first)
    out = np.empty(num_words * 2, dtype=np.float32)
    # Chunks small enough for the cache; every step in place (this loop is the coordinator's hot path).
    radius = np.empty(min(num_words, _CHUNK_WORDS))
    angle = np.empty_like(radius)
    trig = np.empty_like(radius)
    for start in range(0, num_words, _CHUNK_WORDS):
        n = min(_CHUNK_WORDS, num_words - start)
        r, a, t = radius[:n], angle[:n], trig[:n]
        halves = bitgen.random_raw(n).astype("<u8", copy=False).view("<u4")  # low, high, low, high, ...
        # Box-Muller in float64 on the two 32-bit halves of each word, rounded once to float32.
        np.add(halves[0::2], 0.5, out=r)
        r *= _TWO_POW_M32  # u1, exact
        np.log(r, out=r)
        r *= -2.0
        np.sqrt(r, out=r)
        np.add(halves[1::2], 0.5, out=a)
        a *= _TWO_PI_TWO_POW_M32  # 2*pi*u2; scaling by 2^-32 is exact, so this equals 2*pi*(u2)
        pairs = out[2 * start : 2 * (start + n)]
        np.multiply(np.cos(a, out=t), r, out=t)
        pairs[0::2] = t
        np.multiply(np.sin(a, out=t), r, out=t)
        pairs[1::2] = t
    start = offset - first * GAUSSIAN_PER_BLOCK
    return out[start : start + count]


def _rademacher(seed: int, offset: int, count: int) -> np.ndarray:
    first = offset // RADEMACHER_PER_BLOCK
    last = (offset + count - 1) // RADEMACHER_PER_BLOCK
    words = _raw_blocks(seed, first, last - first + 1).reshape(-1)
    bits = np.unpackbits(words.astype("<u8").view(np.uint8), bitorder="little")
    start = offset - first * RADEMACHER_PER_BLOCK
    # bit 0 -> +1, bit 1 -> -1
    return (1.0 - 2.0 * bits[start : start + count]).astype(np.float32)


#: Sparse Gaussians (spec version 2): distribution -> (keep threshold T on a 32-bit half, scale ρ^(-1/2)).
SPARSE = {
    Distribution.SPARSE_GAUSSIAN_0_1: (429_496_730, math.sqrt(10.0)),
    Distribution.SPARSE_GAUSSIAN_0_01: (42_949_673, 10.0),
}


def _sparse_gaussian(seed: int, offset: int, count: int, threshold: int, scale: float) -> np.ndarray:
    """The Gaussian of the same seed times ``scale`` where the keep stream's half is below ``threshold``, else 0."""
    first = offset // GAUSSIAN_PER_BLOCK
    num_blocks = (offset + count - 1) // GAUSSIAN_PER_BLOCK - first + 1
    halves = _philox(seed, first, stream=1).random_raw(num_blocks * 4).astype("<u8", copy=False).view("<u4")
    start = offset - first * GAUSSIAN_PER_BLOCK
    keep = halves[start : start + count] < threshold
    out = np.zeros(count, dtype=np.float32)
    out[keep] = _gaussian(seed, offset, count)[keep].astype(np.float64) * scale  # rounded once, to float32
    return out


_GENERATORS: dict[Distribution, Callable[[int, int, int], np.ndarray]] = {
    Distribution.GAUSSIAN: _gaussian,
    Distribution.RADEMACHER: _rademacher,
    **{d: partial(_sparse_gaussian, threshold=t, scale=k) for d, (t, k) in SPARSE.items()},
}


def generate(seed: int, offset: int, count: int, dist: Distribution | str = Distribution.GAUSSIAN) -> np.ndarray:
    """Elements ``[offset, offset + count)`` of the perturbation with this seed, as float32."""
    if offset < 0 or count < 0:
        raise ValueError(f"offset and count must be non-negative, got offset={offset} count={count}")
    if count == 0:
        return np.empty(0, dtype=np.float32)
    return _GENERATORS[Distribution(dist)](int(seed), int(offset), int(count))


def iter_chunks(seed: int, dim: int, chunk: int, dist: Distribution | str = Distribution.GAUSSIAN):
    """Yield ``(offset, values)`` covering a ``dim``-long perturbation, ``chunk`` values at a time."""
    for offset in range(0, dim, chunk):
        yield offset, generate(seed, offset, min(chunk, dim - offset), dist)


def seed_for(step: int, ordinal: int) -> int:
    """The seed of the ``ordinal``-th perturbation drawn in ``step`` (spec section "Seeds").

    Steps and ordinals each get 32 bits, so no two (step, ordinal) pairs share a seed.
    """
    if not (0 <= step < 1 << 32 and 0 <= ordinal < 1 << 32):
        raise ValueError(f"step and ordinal must fit in 32 bits, got step={step} ordinal={ordinal}")
    return (step << 32) | ordinal
