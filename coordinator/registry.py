"""Who may talk to the coordinator: enrolment, sessions, per-client rate limits and who counts as active.

Last-seen times are kept in memory and written by ``flush_last_seen`` (the server's tick), so a
device's poll costs no write; a client counts as active only once this process has seen it.
A client that went silent holding a task (``silent``) is not selected again until it pulls, and
only clients asking for work (a Join or a pull within the silence limit) are selected, so devices
that joined and sit idle never hold a slot that a wave then waits for.
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
import time
import uuid

from fwdllm.coordinator.config import CoordinatorConfig
from fwdllm.coordinator.messages import PROTOCOL_VERSION, Credentials, Joined, JoinRequest, Reason, Reject
from fwdllm.coordinator.records import Candidate, ClientAuth
from fwdllm.coordinator.state import Store, now_ms, token_hash


class TokenBucket:
    """Per-client request rate limit."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self.buckets: dict[str, tuple[float, float]] = {}
        self.lock = threading.Lock()

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        with self.lock:
            level, last = self.buckets.get(key, (self.burst, now))
            level = min(self.burst, level + (now - last) * self.rate)
            if level < 1:
                self.buckets[key] = (level, now)
                return False
            self.buckets[key] = (level - 1, now)
            return True


def proves(client: ClientAuth, req: JoinRequest) -> bool:
    """Whether ``req`` holds the client's secret and enrolment token."""
    return (
        client.secret_hash is not None
        and secrets.compare_digest(client.secret_hash, token_hash(req.client_secret))
        and client.token_hash == token_hash(req.enrolment_token)
    )


class Registry:
    def __init__(self, store: Store, cfg: CoordinatorConfig, fingerprint: str):
        self.store, self.cfg, self.fingerprint = store, cfg, fingerprint
        self.limiter = TokenBucket(cfg.server.rate_per_s, cfg.server.rate_burst)
        self.last_seen: dict[str, int] = {}
        self.started_ms = now_ms()  # holders not seen by this process are judged from its start
        self.silenced: set[str] = set()
        self.asked: dict[str, int] = {}  # the last Join or pull of each client: when it asked for work

    def authenticate(self, who: Credentials) -> None:
        """Admit a request of a joined client with its session token, within its rate limit."""
        client = self.store.client_auth(who.client_id)
        if client is None:
            raise Reject(
                Reason.UNKNOWN_CLIENT, f"unknown client {who.client_id[:64]!r}: Join first with an enrolment token"
            )
        if not client.active or client.session_hash is None:
            raise Reject(Reason.INACTIVE_CLIENT, "this client left or its enrolment token was revoked: Join again")
        if not secrets.compare_digest(client.session_hash, token_hash(who.session_token)):
            raise Reject(Reason.BAD_TOKEN, "wrong session token for this client")
        if not self.limiter.allow(who.client_id):
            raise Reject(
                Reason.RATE_LIMITED,
                f"more than {self.cfg.server.rate_per_s:g} requests/s from this client; slow down",
            )
        self.last_seen[who.client_id] = now_ms()

    def join(self, req: JoinRequest, theta_version: int, theta_dim: int) -> Joined:
        """A new session. A client that rejoins keeps its id (and its record) only by proving it with the
        secret issued at its first Join (and the same enrolment token): the shared token alone would let
        any enrolled device take over, and log out, another's id. Otherwise it gets a new id and secret."""
        if req.protocol_version != PROTOCOL_VERSION:
            raise Reject(
                Reason.PROTOCOL,
                f"protocol version {req.protocol_version} is not spoken here (v1); update the device",
            )
        state = self.store.token_state(req.enrolment_token)
        if state != "valid":
            raise Reject(
                Reason.TOKEN_REVOKED if state == "revoked" else Reason.TOKEN_UNKNOWN,
                f"enrolment token is {state}; ask the operator for one (`fwdllm coordinator token`)",
            )
        if req.model_fingerprint != self.fingerprint:
            raise Reject(
                Reason.FINGERPRINT,
                f"model fingerprint {req.model_fingerprint[:12]!r} differs from the coordinator's "
                f"{self.fingerprint[:12]}: install the bundle this run trains",
            )
        session = secrets.token_urlsafe(24)
        caps = dataclasses.asdict(req.capabilities)
        name, examples = req.client_name[:200], int(req.num_examples)
        with self.store.transaction():
            previous = self.store.client_auth(req.previous_client_id) if req.previous_client_id else None
            if previous is not None and proves(previous, req):
                client_id, secret = req.previous_client_id, ""
                self.store.rejoin_client(client_id, session, name, caps, examples)
            else:
                client_id, secret = uuid.uuid4().hex, secrets.token_urlsafe(24)
                self.store.add_client(client_id, session, secret, req.enrolment_token, name, caps, examples)
                if req.previous_client_id:
                    self.store.bump("rejoin_unproven")
            self.store.bump("joined")
        self.last_seen[client_id] = self.asked[client_id] = now_ms()
        return Joined(
            client_id=client_id,
            session_token=session,
            model_fingerprint=self.fingerprint,
            theta_dim=theta_dim,
            theta_version=theta_version,
            heartbeat_interval_ms=self.cfg.server.heartbeat_ms,
            client_secret=secret,
        )

    def silent(self, client_ids: set[str], now: int) -> set[str]:
        """Those of ``client_ids`` not heard from for ``server.silent_after_beats`` heartbeat intervals;
        a device beats every interval while it works, so that long means it is gone or stuck."""
        limit = self._silent_after_ms()
        if limit is None:
            return set()
        return {c for c in client_ids if now - self.last_seen.get(c, self.started_ms) > limit}

    def _silent_after_ms(self) -> float | None:
        beats = self.cfg.server.silent_after_beats
        return beats * self.cfg.server.heartbeat_ms if beats > 0 else None

    def silence(self, client_ids: set[str]) -> None:
        """Leave these clients out of selection until they ask for work (``asks_for_work``)."""
        self.silenced |= client_ids

    def asks_for_work(self, client_id: str) -> None:
        self.silenced.discard(client_id)
        self.asked[client_id] = now_ms()

    def leave(self, who: Credentials) -> None:
        with self.store.transaction():
            self.store.deactivate_client(who.client_id)
            self.store.bump("left")
        self.last_seen.pop(who.client_id, None)

    def active(self, now: int) -> list[Candidate]:
        """Enrolled clients seen within ``active_window_s``, not silenced, and asking for work: joined or
        pulled within the silence limit (a device pulls every ``retry_ms`` while it has no task)."""
        window = int(self.cfg.server.active_window_s * 1000)
        asking = self._silent_after_ms()
        return [
            c
            for c in self.store.active_clients()
            if now - self.last_seen.get(c.client_id, 0) <= window
            and c.client_id not in self.silenced
            and (asking is None or now - self.asked.get(c.client_id, 0) <= asking)
        ]

    def count_active(self, now: int) -> int:
        window = int(self.cfg.server.active_window_s * 1000)
        return sum(1 for seen in self.last_seen.values() if now - seen <= window)

    def flush_last_seen(self) -> None:
        with self.store.transaction():
            self.store.record_last_seen(dict(self.last_seen))
