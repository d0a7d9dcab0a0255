"""The coordinator's Prometheus endpoint, scraped during and after a short run on loopback.

The scrape is parsed by prometheus_client's own parser (what a Prometheus server accepts) and each
value is checked against the coordinator's state: its status, its counters and the sums of its
metrics rows.
"""

from __future__ import annotations

import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_coordinator_fixtures import QuadraticDevice, make_bundle
from test_coordinator_server import BASE, drive

from fwdllm.coordinator.config import from_dict
from fwdllm.coordinator.prometheus import CONTENT_TYPE, MetricsEndpoint
from fwdllm.coordinator.rounds import Coordinator
from fwdllm.coordinator.server import start

STEPS = 4
EVAL_EVERY = 3  # evaluated rows: the bundle's θ (step -1), after step 2 and after the last step


def evaluator(theta: np.ndarray) -> dict:
    """A held-out loss and accuracy that are plain functions of θ, so each row's values are known."""
    loss = float(np.square(theta).mean())
    return {"eval_loss": loss, "accuracy": 1.0 / (1.0 + loss)}


def scrape(port: int) -> tuple[str, dict[str, float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        content_type = reply.headers["Content-Type"]
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return content_type, samples


@pytest.fixture()
def served(tmp_path):
    config = {**BASE, "run": {**BASE["run"], "steps": STEPS}, "eval": {"every": EVAL_EVERY}}
    coordinator = Coordinator(make_bundle(tmp_path / "bundle"), tmp_path / "state", from_dict(config), evaluator)
    coordinator.store.add_token("tok")
    server = start(coordinator, "127.0.0.1", 0)
    endpoint = MetricsEndpoint(coordinator, "127.0.0.1", 0)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    devices = [QuadraticDevice(channel, i) for i in range(3)]
    for d in devices:
        d.join("tok", coordinator.fingerprint)
    yield coordinator, endpoint, devices
    endpoint.stop()
    channel.close()
    server.stop(0)


def assert_matches_state(samples: dict[str, float], coordinator: Coordinator, evaluated_theta: np.ndarray) -> None:
    rows = [r for r in coordinator.store.metrics() if r["step"] >= 0]
    assert samples["fwdllm_step"] == coordinator.step == len(rows)
    assert samples["fwdllm_theta_version"] == coordinator.theta_version
    assert samples["fwdllm_clients_registered"] == 3
    for key in ("perturbations", "bytes_up", "bytes_down"):
        assert samples[f"fwdllm_{key}_total"] == sum(r[key] for r in rows), key
    for name, count in coordinator.store.counters().items():
        assert samples[f"fwdllm_events_total{{event={name}}}"] == count, name
    last = coordinator.store.last_metrics()
    held_out = evaluator(evaluated_theta)
    assert samples["fwdllm_accuracy"] == pytest.approx(held_out["accuracy"], rel=1e-12)
    assert samples["fwdllm_eval_loss"] == pytest.approx(held_out["eval_loss"], rel=1e-12)
    assert samples["fwdllm_loss"] == pytest.approx(last["loss"], rel=1e-12)


def test_scrapes_during_and_after_a_run_report_the_coordinators_own_numbers(served):
    coordinator, endpoint, devices = served
    bundle_theta = coordinator.theta.copy()
    mid_run = []

    def scrape_once_mid_run(device, task):
        if task.step == 2 and not mid_run:  # steps 0 and 1 applied, neither evaluated, the run still going
            mid_run.append(scrape(endpoint.port))
            assert_matches_state(mid_run[0][1], coordinator, bundle_theta)

    drive(coordinator, devices, on_task=scrape_once_mid_run)
    content_type, mid = mid_run[0]
    assert content_type == CONTENT_TYPE
    assert mid["fwdllm_step"] == 2 and mid["fwdllm_finished"] == 0
    _, end = scrape(endpoint.port)
    assert end["fwdllm_step"] == STEPS and end["fwdllm_finished"] == 1
    assert_matches_state(end, coordinator, coordinator.theta)
    assert end["fwdllm_bytes_down_total"] > mid["fwdllm_bytes_down_total"] > 0


def test_only_the_metrics_path_is_served(served):
    _, endpoint, _ = served
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://127.0.0.1:{endpoint.port}/", timeout=10)
    assert err.value.code == 404
