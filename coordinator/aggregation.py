"""Seed-encoded forward gradients back into vectors: g = (1/N) sum_i jvp_i * v(seed_i).

The N perturbations form an implicit N x d matrix V that is never held: every product with
it regenerates rows from their seeds one column chunk at a time, so memory is bounded by
``threads * seed_group * chunk`` floats however large N and d are. Chunks run on a thread
pool (the generator and BLAS release the GIL). Seeds are sorted first and every chunk sums
its rows in that fixed order, so the same inputs give bit-identical results on any thread
count: a resumed run reproduces the uninterrupted one.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from fwdllm.errors import UserError
from fwdllm.proto.names import AggregationMethod, Distribution
from fwdllm.proto.perturbation import generate

DEFAULT_CHUNK = 1 << 14
DEFAULT_SEED_GROUP = 32


def default_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


class SeedMatrix:
    """The matrix whose rows are v(seed) for ``seeds``, restricted to columns [start, stop)."""

    def __init__(
        self,
        seeds,
        dim: int,
        dist: Distribution | str = Distribution.GAUSSIAN,
        *,
        start: int = 0,
        stop: int | None = None,
        chunk: int = DEFAULT_CHUNK,
        seed_group: int = DEFAULT_SEED_GROUP,
        threads: int | None = None,
    ):
        self.seeds = np.asarray(seeds, dtype=np.uint64).reshape(-1)
        self.dist = Distribution(dist)
        self.start, self.stop = int(start), int(dim if stop is None else stop)
        if not 0 <= self.start <= self.stop <= dim:
            raise ValueError(f"column range [{start}, {stop}) is outside [0, {dim})")
        self.chunk, self.seed_group = int(chunk), int(seed_group)
        self.threads = threads or default_threads()

    @property
    def width(self) -> int:
        return self.stop - self.start

    def _rows(self, first: int, last: int, offset: int, count: int) -> np.ndarray:
        block = np.empty((last - first, count), dtype=np.float32)
        for r, seed in enumerate(self.seeds[first:last].tolist()):
            block[r] = generate(seed, offset, count, self.dist)
        return block

    def _map_chunks(self, fn) -> list:
        offsets = list(range(self.start, self.stop, self.chunk))
        work = [(o, min(self.chunk, self.stop - o)) for o in offsets]
        if self.threads == 1 or len(work) == 1:
            return [fn(o, c) for o, c in work]
        with ThreadPoolExecutor(self.threads) as pool:
            return list(pool.map(lambda oc: fn(*oc), work))

    def rmatvec(self, coefficients) -> np.ndarray:
        """sum_i coefficients[i] * v(seeds[i])[start:stop], float32, summed in row order."""
        coefficients = np.asarray(coefficients, dtype=np.float32).reshape(-1)
        if coefficients.shape != self.seeds.shape:
            raise ValueError(f"{coefficients.size} coefficients for {self.seeds.size} seeds")
        out = np.zeros(self.width, dtype=np.float32)

        def work(offset: int, count: int) -> None:
            acc = out[offset - self.start : offset - self.start + count]
            for first in range(0, self.seeds.size, self.seed_group):
                last = min(first + self.seed_group, self.seeds.size)
                acc += coefficients[first:last] @ self._rows(first, last, offset, count)

        self._map_chunks(work)
        return out

    def rmatvec_groups(self, coefficients, groups: np.ndarray, num_groups: int, reduce) -> np.ndarray:
        """reduce([num_groups, count] per-group sums of coefficient * v) per column chunk.

        Used for coordinate-wise robust combinations of per-client estimates.
        """
        coefficients = np.asarray(coefficients, dtype=np.float32).reshape(-1)
        out = np.zeros(self.width, dtype=np.float32)

        def work(offset: int, count: int) -> None:
            per_group = np.zeros((num_groups, count), dtype=np.float32)
            for first in range(0, self.seeds.size, self.seed_group):
                last = min(first + self.seed_group, self.seeds.size)
                rows = self._rows(first, last, offset, count) * coefficients[first:last, None]
                np.add.at(per_group, groups[first:last], rows)
            out[offset - self.start : offset - self.start + count] = reduce(per_group)

        self._map_chunks(work)
        return out

    def matvec(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(v_i . x, |v_i|^2) for every row, over columns [start, stop); x has length ``width``."""
        x = np.asarray(x, dtype=np.float32).reshape(-1)
        if x.size != self.width:
            raise ValueError(f"vector of length {x.size} for {self.width} columns")

        def work(offset: int, count: int):
            dots = np.zeros(self.seeds.size, dtype=np.float64)
            sq = np.zeros(self.seeds.size, dtype=np.float64)
            part = x[offset - self.start : offset - self.start + count]
            for first in range(0, self.seeds.size, self.seed_group):
                last = min(first + self.seed_group, self.seeds.size)
                rows = self._rows(first, last, offset, count)
                dots[first:last] = rows @ part
                sq[first:last] = np.einsum("ij,ij->i", rows, rows)
            return dots, sq

        parts = self._map_chunks(work)
        return sum(p[0] for p in parts), sum(p[1] for p in parts)


@dataclass
class CleanedScalars:
    """Scalars ready to aggregate, with what was dropped or clipped on the way."""

    seeds: np.ndarray  # uint64, sorted
    jvp: np.ndarray  # float32, finite and clipped, in seed order
    clients: np.ndarray  # int, index of the contributing client of each scalar
    dropped_nonfinite: int
    clipped: int


MIN_PEERS = 3  # results needed before one of them is judged against the others


def peer_bound(magnitudes: list[np.ndarray], multiple: float) -> float | None:
    """``multiple`` × the median over contributions of each one's median magnitude, or None.

    The median of medians is what one contribution cannot move, however many values it sends
    or how large they are, as long as most contributions are honest. None with fewer than
    ``MIN_PEERS`` non-empty contributions, no multiple, or a zero median (nothing to scale by).
    """
    medians = [float(np.median(m)) for m in magnitudes if m.size]
    if multiple <= 0 or len(medians) < MIN_PEERS:
        return None
    bound = multiple * float(np.median(medians))
    return bound if bound > 0 else None


def clean(
    contributions: list[tuple[np.ndarray, np.ndarray]],
    clip: float | None,
    relative: float = 0.0,
    client_rms: float = 0.0,
) -> CleanedScalars:
    """Drop non-finite scalars, clip the rest to [-clip, clip] and then to the peers' bound, bound each
    result's size against its peers', sort by seed.

    ``contributions`` holds one (seeds, jvp) pair per client result. The peers' bound
    (``peer_bound`` with multiple ``relative``) keeps one scalar from outweighing the others:
    a hostile 1e38 becomes a value like an honest one. That still lets a result send every scalar
    at the bound, several times an honest result's size; so a result whose root-mean-square
    exceeds ``client_rms`` × the median of the results' is scaled down to it (its scalars count
    as clipped). A result's share of the estimate grows with its scalars' root-sum-square, so this
    bounds any one client's pull on θ to that of a few honest ones. Sorting by seed makes the
    aggregate independent of arrival order.
    """
    seed_parts: list[np.ndarray] = [np.empty(0, np.uint64)]
    jvp_parts: list[np.ndarray] = [np.empty(0, np.float32)]
    client_parts: list[np.ndarray] = [np.empty(0, np.int64)]
    for index, (s, j) in enumerate(contributions):
        s = np.asarray(s, dtype=np.uint64).reshape(-1)
        j = np.asarray(j, dtype=np.float32).reshape(-1)
        if s.shape != j.shape:
            raise ValueError(f"{s.size} seeds but {j.size} scalars in contribution {index}")
        seed_parts.append(s)
        jvp_parts.append(j)
        client_parts.append(np.full(s.size, index, dtype=np.int64))
    seeds, jvp, clients = np.concatenate(seed_parts), np.concatenate(jvp_parts), np.concatenate(client_parts)
    finite = np.isfinite(jvp)
    seeds, jvp, clients = seeds[finite], jvp[finite], clients[finite]
    bound = peer_bound([np.abs(jvp[clients == i]) for i in range(len(contributions))], relative)
    if bound is not None:
        clip = bound if clip is None else min(clip, bound)
    clipped = 0
    if clip is not None:
        clipped = int(np.count_nonzero(np.abs(jvp) > clip))
        jvp = np.clip(jvp, np.float32(-clip), np.float32(clip))
    rms = [np.sqrt(np.mean(np.square(jvp[clients == i], dtype=np.float64))) for i in range(len(contributions))]
    rms_bound = peer_bound([np.array([r]) for r in rms if np.isfinite(r)], client_rms)
    if rms_bound is not None:
        for i, r in enumerate(rms):
            if r > rms_bound:
                mine = clients == i
                jvp[mine] *= np.float32(rms_bound / r)
                clipped += int(np.count_nonzero(mine))
    if np.unique(seeds).size != seeds.size:
        raise ValueError("a seed appears twice among the contributions of one step")
    order = np.argsort(seeds, kind="stable")
    return CleanedScalars(seeds[order], jvp[order], clients[order], int((~finite).sum()), clipped)


def trimmed_mean(trim: float):
    def reduce(per_client: np.ndarray) -> np.ndarray:
        k = int(np.floor(trim * per_client.shape[0]))
        ordered = np.sort(per_client, axis=0)
        return ordered[k : per_client.shape[0] - k].mean(axis=0)

    return reduce


def aggregate(
    scalars: CleanedScalars,
    dim: int,
    dist: Distribution | str,
    *,
    method: str = AggregationMethod.MEAN,
    trim: float = 0.1,
    chunk: int = DEFAULT_CHUNK,
    threads: int | None = None,
) -> np.ndarray:
    """The gradient estimate from cleaned scalars.

    ``mean``: (1/N) sum_i jvp_i v_i, the FwdLLM estimator. ``trimmed``/``median``: each
    client's own estimate (its mean of jvp_i v_i), then the coordinate-wise trimmed mean
    (``trim`` of the clients cut at each end) or median across clients.
    """
    if method not in tuple(AggregationMethod):
        raise UserError(f"aggregation method {method!r} is unknown; use one of {list(AggregationMethod)}")
    n = scalars.seeds.size
    if n == 0:
        return np.zeros(dim, dtype=np.float32)
    matrix = SeedMatrix(scalars.seeds, dim, dist, chunk=chunk, threads=threads)
    if method == AggregationMethod.MEAN:
        return matrix.rmatvec(scalars.jvp / np.float32(n))
    present, groups = np.unique(scalars.clients, return_inverse=True)
    counts = np.bincount(groups).astype(np.float32)
    reduce = (
        trimmed_mean(trim)
        if method == AggregationMethod.TRIMMED
        else (lambda per_client: np.median(per_client, axis=0))
    )
    return matrix.rmatvec_groups(scalars.jvp / counts[groups], groups, present.size, reduce)


def split_half_variance(
    scalars: CleanedScalars,
    dim: int,
    dist: Distribution | str,
    start: int,
    stop: int,
    *,
    chunk: int = DEFAULT_CHUNK,
    threads: int | None = None,
) -> float:
    """FwdLLM's variance probe: the mean over probe elements of var(m1, m2) = (m1 - m2)^2 / 2.

    m1 and m2 are the estimates from the two halves of the scalars (alternate seeds, so
    every wave lands in both halves). It estimates ~2 sigma^2 / N and shrinks as waves add
    perturbations. Returns inf with fewer than 2 scalars.
    """
    n = scalars.seeds.size
    if n < 2:
        return float("inf")
    sign = np.where(np.arange(n) % 2 == 0, 1.0 / ((n + 1) // 2), -1.0 / (n // 2)).astype(np.float32)
    diff = SeedMatrix(scalars.seeds, dim, dist, start=start, stop=stop, chunk=chunk, threads=threads).rmatvec(
        scalars.jvp * sign
    )
    return float(np.mean(diff.astype(np.float64) ** 2) / 2.0)
