"""An independent, scalar pure-Python implementation of PERTURBATION.md (spec v2, and so v1).

It shares no code with fwdllm.proto.perturbation: it implements Philox4x64-10 from the
Random123 paper's constants and the spec's transforms element by element with the `math`
module. It is the oracle of the known-answer tests and writes proto/known_answers.json (spec
v1's distributions) and proto/known_answers_v2.json (v2's sparse Gaussians):

    python tests/reference_philox.py
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

M0, M1 = 0xD2E7470EE14C6C93, 0xCA5A826395121157
W0, W1 = 0x9E3779B97F4A7C15, 0xBB67AE8584CAA73B
MASK = (1 << 64) - 1

# Random123 kat_vectors for philox4x64-10: (counter, key) -> output
RANDOM123_KAT = [
    ([0, 0, 0, 0], [0, 0], [0x16554D9ECA36314C, 0xDB20FE9D672D0FDC, 0xD7E772CEE186176B, 0x7E68B68AEC7BA23B]),
    ([MASK] * 4, [MASK] * 2, [0x87B092C3013FE90B, 0x438C3C67BE8D0224, 0x9CC7D7C69CD777B6, 0xA09CAEBF594F0BA0]),
    (
        [0x243F6A8885A308D3, 0x13198A2E03707344, 0xA4093822299F31D0, 0x082EFA98EC4E6C89],
        [0x452821E638D01377, 0xBE5466CF34E90C6C],
        [0xA528F45403E61D95, 0x38C72DBD566E9788, 0xA5A1610E72FD18B5, 0x57BD43B5E52B7FE6],
    ),
]


def philox4x64_10(counter: list[int], key: list[int]) -> list[int]:
    c, k = list(counter), list(key)
    for _ in range(10):
        p0, p1 = M0 * c[0], M1 * c[2]
        c = [(p1 >> 64) ^ c[1] ^ k[0], p1 & MASK, (p0 >> 64) ^ c[3] ^ k[1], p0 & MASK]
        k = [(k[0] + W0) & MASK, (k[1] + W1) & MASK]
    return c


def block(seed: int, index: int, stream: int = 0) -> list[int]:
    """The 4 words of block `index` (256-bit counter, little-endian words) under key (seed, stream)."""
    counter = [(index >> (64 * j)) & MASK for j in range(4)]
    return philox4x64_10(counter, [seed, stream])


def _f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def gaussian(seed: int, i: int) -> float:
    word = block(seed, i // 8)[(i % 8) // 2]
    u1 = ((word & 0xFFFFFFFF) + 0.5) * 2.0**-32
    u2 = ((word >> 32) + 0.5) * 2.0**-32
    r = math.sqrt(-2.0 * math.log(u1))
    angle = 2.0 * math.pi * u2
    return _f32(r * (math.cos(angle) if i % 2 == 0 else math.sin(angle)))


def rademacher(seed: int, i: int) -> float:
    word = block(seed, i // 256)[(i % 256) // 64]
    return -1.0 if (word >> (i % 64)) & 1 else 1.0


def sparse_gaussian(seed: int, i: int, density: float) -> float:
    """Spec v2: the Gaussian scaled by 1/sqrt(density) where stream 1's 32-bit half is below round(density * 2^32)."""
    word = block(seed, i // 8, stream=1)[(i % 8) // 2]
    half = word >> 32 if i % 2 else word & 0xFFFFFFFF
    if half >= round(density * 2**32):
        return 0.0
    return _f32(gaussian(seed, i) * math.sqrt(1.0 / density))


#: spec v2's distributions: name -> density
SPARSE_DENSITIES = {"sparse-gaussian-0.1": 0.1, "sparse-gaussian-0.01": 0.01}


def bits(x: float) -> str:
    return struct.pack("<f", x)[::-1].hex()


CASES = [
    # (seed, offset, count)
    (0, 0, 16),
    (1, 0, 16),
    (42, 5, 11),
    (0xDEADBEEFCAFEF00D, 0, 16),
    ((7 << 32) | 3, 1_000_003, 16),
    (MASK, 10**12 + 7, 16),
    (123456789, (1 << 40) - 5, 16),
]


def known_answers() -> dict:
    out = {"spec_version": 1, "generator": "philox4x64-10, key (seed, 0), counter = block index", "cases": []}
    for seed, offset, count in CASES:
        for dist, fn in (("gaussian", gaussian), ("rademacher", rademacher)):
            values = [fn(seed, offset + j) for j in range(count)]
            out["cases"].append(
                {
                    "seed": str(seed),
                    "offset": offset,
                    "dist": dist,
                    "values": values,
                    "bits": [bits(v) for v in values],
                }
            )
    return out


def known_answers_v2() -> dict:
    """Spec v2's sparse Gaussians; slices long enough that even density 0.01 keeps some elements."""
    out = {"spec_version": 2, "generator": "philox4x64-10, key (seed, stream), counter = block index", "cases": []}
    for seed, offset, _ in CASES:
        for dist, density in SPARSE_DENSITIES.items():
            values = [sparse_gaussian(seed, offset + j, density) for j in range(256)]
            out["cases"].append(
                {"seed": str(seed), "offset": offset, "dist": dist, "values": values, "bits": [bits(v) for v in values]}
            )
    return out


if __name__ == "__main__":
    proto = Path(__file__).resolve().parents[1] / "proto"
    for name, doc in (("known_answers.json", known_answers()), ("known_answers_v2.json", known_answers_v2())):
        (proto / name).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {proto / name}")
