"""An opt-in Prometheus endpoint (`coordinator serve --metrics-port`): the run's progress as scrapeable text.

It reads what `fwdllm coordinator status` shows (``Coordinator.status``) plus running totals of the
metrics rows, so a scrape costs a few small SQLite reads and never touches the gRPC server's threads.
The text is Prometheus' exposition format 0.0.4, served by the standard library (no client package
on the coordinator).
"""

from __future__ import annotations

import logging
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from fwdllm.coordinator.rounds import Coordinator
from fwdllm.errors import UserError

log = logging.getLogger("fwdllm.coordinator")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Run-wide gauges from the status: (metric, help).
STATUS_GAUGES = {
    "step": ("fwdllm_step", "Steps applied so far."),
    "theta_version": ("fwdllm_theta_version", "Version of the current θ (1 is the bundle's)."),
    "clients_registered": ("fwdllm_clients_registered", "Clients that ever joined."),
    "clients_active": ("fwdllm_clients_active", "Clients heard from within the activity window."),
}

#: The latest value of each metrics-row key: row key -> (metric, help).
LATEST_GAUGES = {
    "loss": ("fwdllm_loss", "Devices' mean loss in the last step."),
    "eval_loss": ("fwdllm_eval_loss", "Held-out loss at the latest evaluation."),
    "accuracy": ("fwdllm_accuracy", "Held-out accuracy at the latest evaluation."),
    "perturbations": ("fwdllm_step_perturbations", "Perturbations aggregated in the last step."),
    "clients_answered": ("fwdllm_step_clients_answered", "Clients whose results the last step used."),
    "waves": ("fwdllm_step_waves", "Waves of tasks in the last step (variance control adds waves)."),
    "lr": ("fwdllm_lr", "Learning rate of the last step."),
    "grad_norm": ("fwdllm_grad_norm", "Norm of the last step's gradient estimate."),
    "step_time_s": ("fwdllm_step_seconds", "Wall time of the last step."),
}

#: Sums over every applied step's metrics row: row key -> (metric, help).
TOTALS = {
    "perturbations": ("fwdllm_perturbations_total", "Perturbations aggregated over the run."),
    "bytes_up": ("fwdllm_bytes_up_total", "Bytes devices uploaded over the run (results)."),
    "bytes_down": ("fwdllm_bytes_down_total", "Bytes devices downloaded over the run (tasks, θ, history)."),
}


def exposition(coordinator: Coordinator) -> str:
    """The scrape's text: one HELP/TYPE block per metric family."""
    status = coordinator.status()
    latest = coordinator.store.latest_metric_values(list(LATEST_GAUGES))
    totals = coordinator.store.metric_sums(list(TOTALS))
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
        lines.extend(f"{name}{labels} {_number(value)}" for labels, value in samples)

    for attr, (name, help_text) in STATUS_GAUGES.items():
        family(name, "gauge", help_text, [("", getattr(status, attr))])
    family("fwdllm_finished", "gauge", "1 once the last step is applied.", [("", int(status.finished))])
    for key, (name, help_text) in TOTALS.items():
        family(name, "counter", help_text, [("", totals[key])])
    for key, (name, help_text) in LATEST_GAUGES.items():
        if isinstance(latest.get(key), (int, float)):
            family(name, "gauge", help_text, [("", latest[key])])
    events = sorted(status.counters.items())
    if events:
        family(
            "fwdllm_events_total",
            "counter",
            "Coordinator events by kind (joins, tasks issued, results accepted, duplicates, expiries...).",
            [(f'{{event="{name}"}}', value) for name, value in events],
        )
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")
    return repr(value) if isinstance(value, float) else str(int(value))


class MetricsEndpoint:
    """``GET /metrics`` on its own port and threads; ``stop`` closes it."""

    def __init__(self, coordinator: Coordinator, host: str, port: int):
        handler = _handler(coordinator)
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise UserError(f"cannot serve metrics on {host}:{port} ({exc}); choose another --metrics-port") from exc
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="prometheus", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join()


def _handler(coordinator: Coordinator) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
            if self.path.split("?", 1)[0] != "/metrics":
                self.send_error(404, "only /metrics is served here")
                return
            try:
                body = exposition(coordinator).encode()
            except Exception:  # a scrape must never take the coordinator down; say why once per failure
                log.exception("metrics scrape failed")
                self.send_error(500, "metrics unavailable; see the coordinator's log")
                return
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:  # scrapes every few seconds are not news
            pass

    return Handler
