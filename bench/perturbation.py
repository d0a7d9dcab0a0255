"""Speed of the seeded perturbation generator (spec v1) on one core.

Reports generated values per second and, as a ratio measured in the same run, how much
longer generation takes than numpy merely writing the same number of float32 values
(`np.empty(n).fill`). The coordinator regenerates every perturbation of every client, so
this bounds its aggregation speed.

    python bench/perturbation.py [--values N] [--repeats R]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.report import median_seconds, write_results  # noqa: E402
from fwdllm.proto.names import Distribution  # noqa: E402
from fwdllm.proto.perturbation import generate  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", type=int, default=4_000_000, help="values per generation call")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)

    n = args.values
    buffer = np.empty(n, dtype=np.float32)
    rows = []
    for dist in Distribution:
        seeds = iter(range(1 << 20))
        fill = median_seconds(lambda: buffer.fill(1.0), args.repeats)
        gen = median_seconds(lambda seeds=seeds, dist=dist: generate(next(seeds), 0, n, dist), args.repeats)
        rows.append(
            {
                "distribution": dist,
                "values": n,
                "generate Mvalues/s": n / gen / 1e6,
                "fill Mvalues/s": n / fill / 1e6,
                "generate/fill time ratio": gen / fill,
                "target Mvalues/s": 100.0 if dist == Distribution.GAUSSIAN else "",
            }
        )
    cmd = f"python bench/perturbation.py --values {n} --repeats {args.repeats}"
    path = write_results(
        "perturbation",
        cmd,
        rows,
        [
            "distribution",
            "values",
            "generate Mvalues/s",
            "fill Mvalues/s",
            "generate/fill time ratio",
            "target Mvalues/s",
        ],
        notes="Single thread; medians over repeats. Gaussian = Box-Muller in float64 (log, sqrt, cos, sin per pair).",
    )
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
