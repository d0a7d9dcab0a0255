"""θ on the device, brought to the version a task asks for by the smaller of two downloads.

Replaying the coordinator's update history (about 12 bytes per seed: an 8-byte seed and a
4-byte coefficient) beats downloading θ (4 bytes per value) when few seeds went into the
updates the device missed, and loses badly when many did: `make demo`'s head has d = 1,925
(7.7 KB) and each of its updates about 2,000 seeds (24 KB). So the history request carries
caps, θ's size in bytes and ``replay_max_seeds`` for the replay work (seeds × d generated
values), and the coordinator answers history within them or a refusal of a few bytes without
sending any; the device then downloads θ. Per task the device downloads at most θ's size plus
message overhead. When the coordinator says its updates are not replayable at all (Adam,
momentum, lr groups) the device stops asking until it re-joins, and downloads θ only when a
task names a version other than the one it holds.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np

from fwdllm.device_runtime.connection import RetryingCalls
from fwdllm.errors import UserError
from fwdllm.proto.manifest import Manifest
from fwdllm.proto.names import Distribution
from fwdllm.proto.update_rule import apply_update
from fwdllm.proto.v1 import fwdllm_pb2 as pb

log = logging.getLogger("fwdllm.device")


def theta_from_chunks(chunks: list[pb.ParameterChunk], dim: int) -> tuple[np.ndarray | None, int]:
    """(θ, its version) from FetchParameters' chunks; θ is None when they are incomplete or fail their sha256."""
    buf, digest, version, filled = bytearray(4 * dim), "", 0, 0
    for chunk in chunks:
        if chunk.total != dim or chunk.offset + len(chunk.values) // 4 > dim or len(chunk.values) % 4:
            raise UserError(f"the coordinator sent θ of length {chunk.total}; this bundle's is {dim}")
        buf[4 * chunk.offset : 4 * chunk.offset + len(chunk.values)] = chunk.values
        filled += len(chunk.values) // 4
        version, digest = chunk.version, chunk.sha256 or digest
    if filled != dim or digest != hashlib.sha256(bytes(buf)).hexdigest():
        return None, version
    theta = np.frombuffer(bytes(buf), dtype="<f4").astype(np.float32)
    if not np.isfinite(theta).all():
        raise UserError(f"θ version {version} from the coordinator contains NaN/Inf")
    return theta, version


class ThetaSync(RetryingCalls):
    """The device client's θ: mixed into ``DeviceClient``, whose ``_call``/``_retry``, ``stub``,
    credentials, ``manifest``, ``cfg`` and ``stats`` it uses."""

    # Set by DeviceClient.__init__ (the calls, stub, cfg and stats are RetryingCalls').
    manifest: Manifest
    client_id: str
    session: str

    theta: np.ndarray | None = None
    theta_version = 0
    history_replayable = True  # until the coordinator says otherwise; reset by each Join

    def _theta_at(self, version: int) -> np.ndarray:
        if self.theta is not None and version in (self.theta_version, 0):
            return self.theta
        if (
            self.theta is not None
            and self.history_replayable
            and 0 < self.theta_version < version
            and self._replay(version)
        ):
            return self.theta
        return self._fetch(version)

    def _replay(self, version: int) -> bool:
        """Catch up by replaying updates when the coordinator has them within θ's size and the seed cap."""
        max_bytes, max_seeds = 4 * self.manifest.theta.dim, self.cfg.replay_max_seeds
        resp = self._call(
            "FetchHistory",
            lambda: pb.FetchHistoryRequest(
                client_id=self.client_id,
                session_token=self.session,
                from_version=self.theta_version,
                to_version=version,
                max_bytes=max_bytes,
                max_seeds=max_seeds,
            ),
        )
        if resp.refusal == pb.HISTORY_NOT_REPLAYABLE:
            self.history_replayable = False
            log.info("the coordinator's updates are not replayable; θ is downloaded when its version changes")
        total = sum(len(u.seeds) for u in resp.updates)
        # A coordinator from before the caps ignores them: its answer is checked against them here too.
        if not resp.available or not resp.updates or total > max_seeds or resp.ByteSize() > max_bytes:
            return False
        if [u.version for u in resp.updates] != list(range(self.theta_version + 1, version + 1)):
            return False
        try:
            distributions = [Distribution.from_wire(u.distribution) for u in resp.updates]
        except ValueError:  # a distribution this version cannot generate: download θ instead
            return False
        theta = self.theta
        if theta is None:  # the caller replays only onto a θ it holds
            return False
        for update, distribution in zip(resp.updates, distributions):
            theta = apply_update(theta, update.seeds, update.coefficients, update.lr, str(distribution))
        self.theta, self.theta_version = theta, version
        self.stats["theta_replays"] += 1
        log.info(
            "θ version %d rebuilt from %d updates (%d seeds, %d bytes) instead of downloading %d bytes",
            version,
            len(resp.updates),
            total,
            resp.ByteSize(),
            max_bytes,
        )
        return True

    def _fetch(self, version: int) -> np.ndarray:
        d = self.manifest.theta.dim
        for attempt in range(3):
            chunks = self._retry(
                "FetchParameters",
                lambda: list(
                    self.stub.FetchParameters(
                        pb.FetchParametersRequest(
                            client_id=self.client_id, session_token=self.session, version=version
                        ),
                        timeout=self.cfg.rpc_timeout_s,
                    )
                ),
            )
            theta, got_version = theta_from_chunks(chunks, d)
            if theta is not None:
                self.theta, self.theta_version = theta, got_version
                self.stats["theta_fetches"] += 1
                return theta
            log.warning("θ download %d was incomplete or corrupt (sha256 mismatch); fetching again", attempt + 1)
        raise UserError("θ downloads keep failing their sha256 check; check the network path to the coordinator")
