"""The device client against a small real gRPC coordinator on loopback.

The servicer (tests/mini_coordinator.py) implements just enough of the v1 contract to drive the client through
joins, θ downloads and history replay, lost acknowledgements, a coordinator restart,
cancellation, deadlines and bad tasks. Submitted jvps are checked against autograd.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter

import numpy as np
import pytest
import torch
from device_standin import initial_theta
from mini_coordinator import (
    MiniCoordinator,
    bundle,  # noqa: F401 (fixture)
    client_for,
    data,  # noqa: F401 (fixture)
    make_task,
    serve,
)

from fwdllm.device_runtime.client import ClientError
from fwdllm.device_runtime.examples import select
from fwdllm.proto.manifest import load_manifest
from fwdllm.proto.perturbation import generate
from fwdllm.proto.v1 import fwdllm_pb2 as pb


def run_in_thread(client, **kw):
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("rc", client.run(**kw)), daemon=True)
    thread.start()
    return thread, box


def autograd_jvp(model, batch, theta, seeds):
    """∇f(θ)·v(seed) in float64: autograd's gradient (one backward pass) dotted with each perturbation."""
    ids, mask, labels = (torch.tensor(x) for x in (batch.input_ids, batch.attention_mask, batch.labels))
    model = model.double()  # a float64 copy
    grad = torch.func.grad(lambda x: model.loss(ids, mask, labels, x[None])[0][0])(
        torch.tensor(theta, dtype=torch.float64)
    ).numpy()
    return np.array([generate(s, 0, grad.size).astype(np.float64) @ grad for s in seeds])


def test_client_serves_tasks_replays_history_and_matches_autograd(bundle, data, caplog):
    fingerprint = load_manifest(bundle[0]).fingerprint()
    theta1 = initial_theta(5)
    update = pb.UpdateRecord(version=2, lr=0.1, seeds=[11, 12], coefficients=[0.5, -0.25], distribution=pb.GAUSSIAN)
    theta2 = (
        theta1.astype(np.float64)
        - 0.1 * (0.5 * generate(11, 0, theta1.size).astype(np.float64) - 0.25 * generate(12, 0, theta1.size))
    ).astype(np.float32)
    tasks = [
        make_task("t1", 1, seeds=[5, 9], start=100, count=3, batch=(5, 4)),
        make_task("t2", 2, start=1 << 32, count=4, batch=(0, 3)),
    ]
    coord = MiniCoordinator(fingerprint, {1: theta1, 2: theta2}, tasks, history=[update])
    server, port = serve(coord)
    try:
        client = client_for(bundle, data, port)
        with caplog.at_level(logging.INFO, logger="fwdllm.device"):
            assert client.run() == 0
    finally:
        server.stop(0)
    assert coord.left and len(coord.joins) == 1
    caps = coord.joins[0].capabilities
    assert caps.backend == "onnxruntime" and "CPUExecutionProvider" in caps.delegates and caps.cpu_count >= 1
    assert client.stats["theta_fetches"] == 1 and client.stats["theta_replays"] == 1
    assert sum(r.getMessage().startswith("task ") for r in caplog.records) == 2  # one line per task
    examples = client.data.examples
    for task, theta in ((tasks[0], theta1), (tasks[1], theta2)):
        got = coord.results[task.task_id]
        seeds = list(task.seeds) + [task.seed_ranges[0].start + i for i in range(task.seed_ranges[0].count)]
        assert list(got.seeds) == seeds and got.num_examples == task.batch.size and list(got.nonfinite) == []
        batch = client.data.tokenizer.batch(select(examples, task.batch.start, task.batch.size))
        np.testing.assert_allclose(got.jvp, autograd_jvp(bundle[1], batch, theta, seeds), rtol=0, atol=1.5e-2)
        assert np.isnan(got.loss.base) and got.loss.min <= got.loss.mean <= got.loss.max


def test_lost_acknowledgement_is_resubmitted_and_never_accepted_twice(bundle, data):
    fingerprint = load_manifest(bundle[0]).fingerprint()
    tasks = [make_task(f"t{i}", 1, seeds=[i, i + 10]) for i in range(3)]
    coord = MiniCoordinator(fingerprint, {1: initial_theta()}, tasks)
    coord.lose_ack = {"t1"}
    server, port = serve(coord)
    try:
        client = client_for(bundle, data, port)
        assert client.run() == 0
    finally:
        server.stop(0)
    assert coord.submits == Counter({"t0": 1, "t1": 2, "t2": 1})
    assert client.stats["duplicate"] == 1 and client.stats["accepted"] == 2 and not client.pending


def test_survives_a_coordinator_restart_and_keeps_its_identity(bundle, data, tmp_path):
    fingerprint = load_manifest(bundle[0]).fingerprint()
    tasks = [make_task(f"t{i}", 1, seeds=[i]) for i in range(4)]
    first = MiniCoordinator(fingerprint, {1: initial_theta()}, tasks)
    first.pull_delay_s = 0.2
    server, port = serve(first)
    client = client_for(bundle, data, port, state_file=tmp_path / "device.json")
    thread, box = run_in_thread(client)
    while len(first.results) < 1:
        time.sleep(0.02)
    server.stop(0)  # the coordinator goes away; the device retries with backoff
    time.sleep(0.5)
    second = MiniCoordinator(fingerprint, {1: initial_theta()}, tasks)  # restarted: results kept, sessions lost
    second.results, second.skipped, second.submits = first.results, set(first.results), first.submits
    server, _ = serve(second, port)
    try:
        thread.join(timeout=60)
    finally:
        server.stop(0)
    assert box.get("rc") == 0
    assert sorted(second.results) == ["t0", "t1", "t2", "t3"]
    assert second.joins[0].previous_client_id == client.client_id  # re-joined under its old identity ...
    assert second.joins[0].client_secret == f"secret-of-{client.client_id}"  # ... proven by its first join's secret
    assert json.loads((tmp_path / "device.json").read_text())["client_secret"] == client.client_secret
    assert client.stats["retries"] >= 1 and client.stats["rejoins"] >= 1
    assert (tmp_path / "device.json").is_file() and max(first.submits.values()) <= 2


def test_refuses_a_bundle_of_another_model(bundle, data):
    coord = MiniCoordinator("f" * 64, {1: initial_theta()}, [], checks_fingerprint=False)
    server, port = serve(coord)
    try:
        with pytest.raises(ClientError, match="not the model this coordinator trains"):
            client_for(bundle, data, port).run()
        strict = MiniCoordinator("f" * 64, {1: initial_theta()}, [])
        server2, port2 = serve(strict)
        try:
            with pytest.raises(ClientError, match="FAILED_PRECONDITION"):
                client_for(bundle, data, port2).run()
        finally:
            server2.stop(0)
    finally:
        server.stop(0)


def test_cancelled_late_and_bad_tasks_are_not_submitted_and_serving_continues(bundle, data, caplog):
    fingerprint = load_manifest(bundle[0]).fingerprint()
    huge = initial_theta()
    huge[:] = 3e38  # activations overflow: every loss is NaN
    tasks = [
        make_task("late", 1, seeds=[1], deadline_ms=int(time.time() * 1000) - 1000),
        make_task("cancelled", 1, seeds=[2]),
        make_task("too-many", 1, start=0, count=9),
        make_task("nan", 2, seeds=[3, 4]),
        make_task("fine", 1, seeds=[5]),
    ]
    coord = MiniCoordinator(fingerprint, {1: initial_theta(), 2: huge}, tasks)
    coord.cancel = {"cancelled"}
    coord.pull_delay_s = 0.15  # heartbeats (every 50 ms) deliver the cancellation before the task starts
    server, port = serve(coord)
    try:
        client = client_for(bundle, data, port, max_seeds=8)
        with caplog.at_level(logging.INFO, logger="fwdllm.device"):
            assert client.run() == 0
    finally:
        server.stop(0)
    assert sorted(coord.results) == ["fine", "nan"]
    nan = coord.results["nan"]
    assert list(nan.nonfinite) == [0, 1] and list(nan.jvp) == [0.0, 0.0]
    text = caplog.text
    assert "deadline passed" in text and "cancelled by the coordinator" in text and "at most 8" in text
    assert client.stats["failed"] == 1 and client.stats["cancelled"] == 2


@pytest.mark.parametrize("hold_ms", [0, 400])
def test_a_device_asks_to_be_held_when_join_offers_it_and_sends_no_beats_while_held(bundle, data, hold_ms):
    """Each pull here takes 0.4 s (a held call); beats go every 50 ms, about 16 in the 0.8 s the two pulls
    are open. A device offered holds sends none while a pull is open (at most one or two fall in the few ms
    between its submit and its next pull); one that is not offered holds beats throughout, as before."""
    fingerprint = load_manifest(bundle[0]).fingerprint()
    coord = MiniCoordinator(fingerprint, {1: initial_theta()}, [make_task("only", 1, seeds=[5])])
    coord.pull_wait_ms, coord.pull_delay_s = hold_ms, 0.4
    server, port = serve(coord)
    try:
        assert client_for(bundle, data, port).run() == 0
    finally:
        server.stop(0)
    assert [p.wait_ms for p in coord.pulls] == [hold_ms, hold_ms]  # the task, then "run finished"
    idle_beats = [b for b in coord.beats if not b.task_id]
    assert (len(idle_beats) <= 2) if hold_ms else (len(idle_beats) >= 8)
