"""The device client's link to the coordinator: a gRPC channel, and calls retried until the coordinator answers.

Transient failures back off exponentially with jitter; a session the coordinator no longer knows is
joined again under the same client id; every other code is the coordinator's final answer.
"""

from __future__ import annotations

import logging
import random
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from fwdllm.errors import UserError

if TYPE_CHECKING:
    from fwdllm.device_runtime.client import ClientConfig

log = logging.getLogger("fwdllm.device")

#: Codes that mean "try again later"; anything else is the coordinator's final answer.
TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
}
MAX_MESSAGE_BYTES = 64 << 20


class ClientError(UserError):
    """The device cannot take part in this run (wrong bundle, bad token, ...); the message says why."""


def transport_timeout(exc: grpc.RpcError) -> bool:
    """gRPC's own call timeout, as opposed to the coordinator refusing a late result (same status code)."""
    return exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and exc.details() == "Deadline Exceeded"


def open_channel(address: str, tls_ca: Path | None, backoff_s: tuple[float, float]) -> grpc.Channel:
    """A channel to ``address``, over TLS when the coordinator's CA certificate is given."""
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.initial_reconnect_backoff_ms", int(backoff_s[0] * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(backoff_s[1] * 1000)),
    ]
    if tls_ca:
        ca = Path(tls_ca)
        if not ca.is_file():
            raise ClientError(f"--tls-ca {ca} does not exist; pass the coordinator's CA certificate (PEM)")
        return grpc.secure_channel(address, grpc.ssl_channel_credentials(ca.read_bytes()), options)
    return grpc.insecure_channel(address, options)


class RetryingCalls(ABC):
    """Calls to the coordinator: mixed into ``DeviceClient``, whose ``stub``, ``cfg``, ``stats``, ``_stop``
    and ``join`` it uses."""

    # Set by DeviceClient.__init__.
    stub: Any  # the generated FwdLLMStub (grpc is not analysed)
    cfg: ClientConfig
    stats: dict[str, int]
    _stop: threading.Event

    @abstractmethod
    def join(self) -> Any:
        """Join the run (again): ``DeviceClient.join``."""

    def _call(self, method: str, make: Callable[[], Any], final: frozenset = frozenset()):
        """One unary call, retried until the coordinator answers (see ``_retry``)."""
        return self._retry(method, lambda: getattr(self.stub, method)(make(), timeout=self.cfg.rpc_timeout_s), final)

    def _retry(self, method: str, attempt: Callable[[], Any], final: frozenset = frozenset()):
        """Back off on transient failures, re-join a lost session; codes in ``final`` and others are raised."""
        delay = self.cfg.backoff_s[0]
        while True:
            try:
                return attempt()
            except grpc.RpcError as exc:
                code = exc.code()
                if code in final and not transport_timeout(exc):
                    raise
                if code == grpc.StatusCode.UNAUTHENTICATED and method != "Join":
                    log.info("%s: session not known to the coordinator (%s); joining again", method, exc.details())
                    self.stats["rejoins"] += 1
                    self.join()
                    continue
                if (code not in TRANSIENT and not transport_timeout(exc)) or self._stop.is_set():
                    raise
                self.stats["retries"] += 1
                wait = delay * random.uniform(0.5, 1.0)
                log.warning("%s failed (%s: %s); retrying in %.1f s", method, code.name, exc.details(), wait)
                self._stop.wait(wait)
                delay = min(delay * 2, self.cfg.backoff_s[1])
