"""The device client's link to the coordinator: a gRPC channel, and calls retried until the coordinator answers.

Transient failures back off exponentially with jitter; a session the coordinator no longer knows is
joined again under the same client id; every other code is the coordinator's final answer. Over
TLS, gRPC reports a certificate that can never work (a wrong CA, a host name the certificate does
not name, a client certificate the coordinator refuses) as UNAVAILABLE, like a coordinator that is
down; a TLS handshake of its own (``certificate_problem``) tells them apart, so the device exits
with the reason instead of retrying forever.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
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
#: HTTP/2's connection preface and an empty SETTINGS frame: a gRPC server answers with its SETTINGS.
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")


class ClientError(UserError):
    """The device cannot take part in this run (wrong bundle, bad token, ...); the message says why."""


def transport_timeout(exc: grpc.RpcError) -> bool:
    """gRPC's own call timeout, as opposed to the coordinator refusing a late result (same status code)."""
    return exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and exc.details() == "Deadline Exceeded"


def open_channel(
    address: str,
    tls_ca: Path | None,
    backoff_s: tuple[float, float],
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
) -> grpc.Channel:
    """A channel to ``address``: over TLS when the coordinator's CA certificate is given, presenting this
    device's certificate when ``tls_cert`` and ``tls_key`` are (for a coordinator that requires one)."""
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.initial_reconnect_backoff_ms", int(backoff_s[0] * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(backoff_s[1] * 1000)),
    ]
    if (tls_cert is None) != (tls_key is None):
        raise ClientError("give both --tls-cert and --tls-key (this device's certificate and its key), or neither")
    if tls_ca is None and tls_cert is None:
        return grpc.insecure_channel(address, options)
    ca = _read_pem("--tls-ca", "the coordinator's CA certificate", tls_ca) if tls_ca else None
    cert = _read_pem("--tls-cert", "this device's certificate", tls_cert) if tls_cert else None
    key = _read_pem("--tls-key", "the key of --tls-cert", tls_key) if tls_key else None
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(ca, key, cert), options)


def _read_pem(option: str, what: str, path: Path) -> bytes:
    if not Path(path).is_file():
        raise ClientError(f"{option} {path} does not exist; pass {what} (PEM)")
    return Path(path).read_bytes()


def certificate_problem(
    address: str, tls_ca: Path | None, tls_cert: Path | None, tls_key: Path | None, timeout_s: float = 5.0
) -> str | None:
    """Why TLS with the coordinator at ``address`` can never succeed, or None when it may (it answered, or
    could not be reached: it may be down or restarting). The handshake is Python's, with the same files."""
    host, _, port_text = address.rpartition(":")
    host = host.strip("[]")
    if not port_text.isdigit():
        return None  # an address gRPC resolves its own way (dns:///..., unix:...): no probe
    port = int(port_text)
    try:
        context = ssl.create_default_context(cafile=tls_ca)
        if tls_cert is not None:
            context.load_cert_chain(tls_cert, tls_key)
    except (ssl.SSLError, ValueError) as exc:
        return (
            f"the TLS files cannot be used ({exc}); pass PEM files: --tls-ca a certificate, --tls-cert/--tls-key a pair"
        )
    context.set_alpn_protocols(["h2"])
    try:
        # A coordinator closing once after the handshake may be restarting; twice in a row, it refuses.
        if _handshake(context, host, port, timeout_s) != "closed":
            return None
        if _handshake(context, host, port, timeout_s) != "closed":
            return None
    except ssl.SSLCertVerificationError as exc:
        return (
            f"the coordinator at {address} presented a certificate that --tls-ca does not verify "
            f"({exc.verify_message}); pass the CA certificate that signed it, and an address the certificate names"
        )
    if tls_cert is None:
        return (
            f"the coordinator at {address} closes every TLS connection after the handshake: it requires a client "
            "certificate; pass --tls-cert and --tls-key signed by the CA it trusts"
        )
    return (
        f"the coordinator at {address} refused this device's certificate {tls_cert}; pass one signed by the "
        "CA it trusts (its --tls-client-ca)"
    )


def _handshake(context: ssl.SSLContext, host: str, port: int, timeout_s: float) -> str:
    """What one handshake met: "answered", "closed" (by the coordinator, over a certificate) or "unreachable";
    a certificate the context does not verify raises ``ssl.SSLCertVerificationError``."""
    try:
        raw = socket.create_connection((host, port), timeout=timeout_s)
    except OSError:
        return "unreachable"
    with raw:
        try:
            tls = context.wrap_socket(raw, server_hostname=host)
        except ssl.SSLCertVerificationError:
            raise
        except ssl.SSLError as exc:
            return "closed" if "CERTIFICATE" in str(exc).upper() or "UNKNOWN_CA" in str(exc).upper() else "unreachable"
        except OSError:
            return "unreachable"
        with tls:
            try:
                tls.sendall(HTTP2_PREFACE)
                return "answered" if tls.recv(9) else "closed"
            except TimeoutError:
                return "unreachable"
            except OSError:  # ssl.SSLError included: an alert over the certificate, or a reset
                return "closed"


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

    def _call(self, method: str, make: Callable[[], Any], final: frozenset = frozenset(), hold_s: float = 0.0):
        """One unary call, retried until the coordinator answers (see ``_retry``); ``hold_s``: how long the
        coordinator may hold it before answering, on top of the usual timeout."""
        timeout = self.cfg.rpc_timeout_s + hold_s
        return self._retry(method, lambda: getattr(self.stub, method)(make(), timeout=timeout), final)

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
                if code == grpc.StatusCode.UNAVAILABLE and (self.cfg.tls_ca or self.cfg.tls_cert):
                    problem = certificate_problem(
                        self.cfg.coordinator, self.cfg.tls_ca, self.cfg.tls_cert, self.cfg.tls_key
                    )
                    if problem:
                        raise ClientError(problem) from None
                self.stats["retries"] += 1
                wait = delay * random.uniform(0.5, 1.0)
                log.warning("%s failed (%s: %s); retrying in %.1f s", method, code.name, exc.details(), wait)
                self._stop.wait(wait)
                delay = min(delay * 2, self.cfg.backoff_s[1])
