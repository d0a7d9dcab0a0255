"""FwdLLM's discriminative sampler: hand out the candidate perturbations most aligned with the last gradient.

Ranking is joint over the whole theta: with the seeded spec one seed names one whole vector,
so a per-tensor choice (the reference's) would need a device to build v from several seeds.
All candidates are ranked (the reference ranked only its last 1,000). The cosine is signed,
as in the reference: a perturbation pointing against the gradient gives the same
information but is not preferred. Only odd steps sample (the reference's interval
sampling), so even steps stay unbiased plain draws.
"""

from __future__ import annotations

import numpy as np

from fwdllm.coordinator.aggregation import SeedMatrix
from fwdllm.proto.names import Distribution


def cosines(seeds, reference: np.ndarray, dist: Distribution | str, *, threads: int | None = None) -> np.ndarray:
    """Signed cosine similarity of v(seed) with ``reference`` for every seed (float64)."""
    reference = np.asarray(reference, dtype=np.float32)
    dots, sq = SeedMatrix(seeds, reference.size, dist, threads=threads).matvec(reference)
    ref_norm = float(np.linalg.norm(reference.astype(np.float64)))
    return dots / np.maximum(np.sqrt(sq) * ref_norm, 1e-30)


def select(
    candidates, reference: np.ndarray, k: int, dist: Distribution | str, *, threads: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The k candidates with the highest cosine to ``reference``, best first, and their cosines."""
    candidates = np.asarray(candidates, dtype=np.uint64)
    scores = cosines(candidates, reference, dist, threads=threads)
    order = np.argsort(-scores, kind="stable")[:k]
    return candidates[order], scores[order]


def samples_this_step(step: int) -> bool:
    """Interval sampling: odd steps use the sampler, even steps draw plainly."""
    return step % 2 == 1
