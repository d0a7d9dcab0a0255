"""θ for devices: any kept version from the checkpoints, or the updates since a version, for replay.

History is the cheap way to catch up (a few seeds and coefficients per version instead of θ),
available only when an update is a seeded sum that a device can redo (``Updates.replayable``).
The caps are checked before anything is read: the stored seed count bounds the replay work and,
at 4 bytes per coefficient, the answer's size from below, so an over-long history is refused
without reading it.
"""

from __future__ import annotations

import numpy as np

from fwdllm.coordinator.config import CoordinatorConfig
from fwdllm.coordinator.messages import History, HistoryQuery, HistoryRefusal, Reason, Reject
from fwdllm.coordinator.state import Store
from fwdllm.coordinator.updates import Updates


class ThetaServing:
    def __init__(self, store: Store, cfg: CoordinatorConfig, updates: Updates):
        self.store, self.cfg, self.updates = store, cfg, updates

    def checkpoint(self, version: int, current: int) -> np.ndarray:
        """θ of an earlier ``version``, from its checkpoint while one is kept."""
        if version > current or not self.store.checkpoint_path(version).is_file():
            raise Reject(
                Reason.UNKNOWN_VERSION,
                f"theta version {version} is not kept (current {current}); ask for 0, the latest",
            )
        return self.store.load_checkpoint(version, self.updates.layout)[0]

    def history(self, query: HistoryQuery, current: int) -> History:
        """The updates in (from_version, to_version], or the refusal that sends the device to θ."""
        dim, dist = self.updates.layout.dim, self.cfg.run.distribution

        def refuse(why: HistoryRefusal) -> History:
            return History(theta_dim=dim, distribution=dist, refusal=why)

        if not self.updates.replayable:
            return refuse(HistoryRefusal.NOT_REPLAYABLE)
        upto, start = query.to_version or current, query.from_version
        if not 1 <= start <= upto <= current:
            return refuse(HistoryRefusal.NOT_KEPT)
        wanted = list(range(start + 1, upto + 1))
        counts = self.store.history_seed_counts(start, upto)
        if list(counts) != wanted:
            return refuse(HistoryRefusal.NOT_KEPT)
        seeds = sum(counts.values())
        if (query.max_seeds and seeds > query.max_seeds) or (query.max_bytes and 4 * seeds > query.max_bytes):
            return refuse(HistoryRefusal.OVER_CAP)
        records = self.store.history(start, upto)
        if [r.version for r in records] != wanted:  # a step pruned the oldest record between the two reads
            return refuse(HistoryRefusal.NOT_KEPT)
        return History(theta_dim=dim, distribution=dist, updates=records)
