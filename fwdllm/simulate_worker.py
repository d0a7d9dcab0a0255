"""A `fwdllm simulate` device worker process: many virtual clients, each a real ``DeviceClient``, one backend.

Clients join in order (so the coordinator sees a fixed join order), then serve concurrently; a
lock serialises their backend calls, so a worker uses one core however many clients it hosts.
SIGTERM and SIGINT pause the clients for ``--resume`` instead of making them leave.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import cast

from fwdllm.device_runtime.backend import DEFAULT_BACKEND, Backend


class SerializedBackend:
    """A backend shared by the virtual clients of one worker: one computation at a time."""

    def __init__(self, backend):
        self._backend, self._lock = backend, threading.Lock()

    def losses(self, batch, thetas):
        with self._lock:
            return self._backend.losses(batch, thetas)

    def logits(self, batch, theta):
        with self._lock:
            return self._backend.logits(batch, theta)

    def __getattr__(self, name):
        return getattr(self._backend, name)


def worker_main(argv: list[str] | None = None) -> int:
    """Host virtual clients ``first .. first+count-1`` of a partition; join them in order, then serve."""
    p = argparse.ArgumentParser(prog="python -m fwdllm.simulate_worker", description=worker_main.__doc__)
    p.add_argument("--coordinator", required=True)
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--partition", required=True, type=Path)
    p.add_argument("--first", required=True, type=int)
    p.add_argument("--count", required=True, type=int)
    p.add_argument("--token", required=True)
    p.add_argument("--devices", required=True, type=Path, help="folder for the clients' state files")
    p.add_argument("--backend", default=DEFAULT_BACKEND)
    p.add_argument("--ready", required=True, type=Path, help="file created once every client has joined")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from fwdllm.data.partition import client_file
    from fwdllm.device_runtime.backend import open_backend
    from fwdllm.device_runtime.client import ClientConfig, DeviceClient
    from fwdllm.proto.manifest import load_manifest

    manifest = load_manifest(args.bundle)
    shared = SerializedBackend(open_backend(args.bundle, args.backend, options={"threads": 1}, manifest=manifest))
    clients = []
    for i in range(args.first, args.first + args.count):
        cfg = ClientConfig(
            coordinator=args.coordinator,
            bundle=args.bundle,
            data=args.partition / client_file(i),
            backend=args.backend,
            token=args.token,
            name=f"sim-{i:05d}",
            state_file=args.devices / f"client-{i:05d}.json",
        )
        # the proxy stands in for the Backend it wraps: every attribute but the locked calls is forwarded
        client = DeviceClient(cfg, backend=cast(Backend, shared))
        client.join()
        clients.append(client)
    stop = threading.Event()

    def on_signal(*_):  # a pause for --resume, not a departure: the devices keep their tasks
        stop.set()
        for c in clients:
            c.stop(leave=False)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    codes: list[int] = []
    threads = [
        threading.Thread(target=lambda c=c: codes.append(c.run()), name=c.cfg.name, daemon=True) for c in clients
    ]
    for t in threads:
        t.start()
    args.ready.touch()
    for t in threads:
        while t.is_alive():
            t.join(0.5)
    return 0 if stop.is_set() or (len(codes) == len(clients) and all(code == 0 for code in codes)) else 1


if __name__ == "__main__":
    sys.exit(worker_main())
