"""The coordinator core without gRPC: whole runs driven with plain objects, checked against direct computations.

Devices here have the loss 0.5 * |theta - target|^2, so a directional derivative is exactly
v(seed) . (theta - target); every update is recomputed from the seeds with the perturbation
generator, independently of the coordinator's aggregation.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from test_coordinator_fixtures import LAYOUT, dense_v, make_bundle

from fwdllm.coordinator.config import from_dict
from fwdllm.coordinator.messages import Credentials, JoinRequest, Reason, Reject, Submission
from fwdllm.coordinator.records import Task
from fwdllm.coordinator.rounds import Coordinator
from fwdllm.proto.perturbation import seed_for

THETA0 = np.linspace(-1, 1, LAYOUT.dim, dtype=np.float32).astype(np.float64)


class Device:
    def __init__(self, coordinator: Coordinator, index: int):
        self.c = coordinator
        self.target = np.random.default_rng(100 + index).normal(size=LAYOUT.dim)
        joined = coordinator.join(JoinRequest(enrolment_token="tok", model_fingerprint=coordinator.fingerprint))
        self.who = Credentials(joined.client_id, joined.session_token)
        self.dist = "gaussian"

    def pull(self) -> Task | None:
        pulled = self.c.pull(self.who)
        if pulled.offer is None:
            return None
        self.dist = pulled.offer.distribution  # the device computes with the distribution its task names
        return pulled.offer.task

    def jvp(self, task: Task) -> np.ndarray:
        theta = self.c.fetch_parameters(self.who, task.theta_version)[1].astype(np.float64)
        return (dense_v(task.seeds, dist=self.dist) @ (theta - self.target)).astype(np.float32)

    def submit(self, task: Task, jvp=None, **changes):
        jvp = self.jvp(task) if jvp is None else jvp
        sub = Submission(self.who, task.task_id, task.step, task.seeds, jvp, loss_mean=1.0, num_examples=8)
        return self.c.submit(dataclasses.replace(sub, **changes))


def start(tmp_path, clients: int, evaluator=None, **sections) -> tuple[Coordinator, list[Device]]:
    run = {"steps": 3, "clients_per_step": clients, "over_select": 0.0, "min_clients": clients}
    settings = {
        "run": {**run, "perturbations_per_client": 2},
        "optimizer": {"lr": 0.05, "schedule": "constant"},
        "aggregation": {"threads": 1},
    }
    for name, values in sections.items():
        settings[name] = {**settings.get(name, {}), **values}
    c = Coordinator(make_bundle(tmp_path / "b"), tmp_path / "s", from_dict(settings), evaluator=evaluator)
    c.store.add_token("tok")
    return c, [Device(c, i) for i in range(clients)]


def run_step(devices: list[Device]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every device with a task answers it; the (seeds, jvp) pairs submitted."""
    sent = []
    for d in devices:
        task = d.pull()
        if task is not None:
            jvp = d.jvp(task)
            d.submit(task, jvp)
            sent.append((task.seeds, jvp))
    return sent


def sgd_step(theta: np.ndarray, sent, lr: float, dist: str = "gaussian") -> np.ndarray:
    """theta - lr * mean_i jvp_i v(seed_i), from the seeds."""
    seeds = np.concatenate([s for s, _ in sent])
    jvp = np.concatenate([j for _, j in sent]).astype(np.float64)
    return theta - lr * (jvp @ dense_v(seeds, dist=dist)) / seeds.size


@pytest.mark.parametrize("dist", ["gaussian", "sparse-gaussian-0.1"])
def test_a_whole_run_updates_theta_as_computed_from_the_seeds(tmp_path, dist):
    c, devices = start(tmp_path, clients=3, run={"distribution": dist})
    theta = THETA0
    for step in range(3):
        sent = run_step(devices)
        assert len(sent) == 3 and c.step == step + 1 and devices[0].dist == dist
        seeds = np.concatenate([s for s, _ in sent])
        assert sorted(seeds.tolist()) == [seed_for(step, o) for o in range(6)]  # fresh seeds, none reused
        theta = sgd_step(theta, sent, 0.05, dist)
        np.testing.assert_allclose(c.theta, theta, atol=1e-5)
        record = c.store.history(step + 1, step + 2)[0]  # what devices replay equals the same update
        replayed = c.theta_at(step + 1)[1] - record.lr * (record.coefficients @ dense_v(record.seeds, dist=dist))
        np.testing.assert_allclose(replayed, c.theta, atol=1e-5)
    assert c.run.finished and c.pull(devices[0].who).run_finished
    rows = c.store.metrics()
    assert [r["step"] for r in rows] == [0, 1, 2] and all(r["perturbations"] == 6 for r in rows)
    c.close()


def test_results_are_checked_and_refused_with_a_reason(tmp_path):
    c, (a, b) = start(tmp_path, clients=2)
    task_a, task_b = a.pull(), b.pull()

    def reason(fn) -> Reason:
        with pytest.raises(Reject) as info:
            fn()
        return info.value.reason

    assert reason(lambda: b.submit(task_a)) == Reason.NOT_YOUR_TASK
    assert reason(lambda: a.submit(task_a, seeds=task_a.seeds + 1)) == Reason.WRONG_SEEDS
    assert reason(lambda: a.submit(task_a, jvp=np.array([np.nan, 1.0], np.float32))) == Reason.NONFINITE
    assert reason(lambda: a.submit(task_a, step=5)) == Reason.WRONG_ROUND
    assert reason(lambda: c.pull(Credentials(a.who.client_id, "wrong"))) == Reason.BAD_TOKEN
    assert not a.submit(task_a).duplicate and a.submit(task_a).duplicate  # the same result again
    assert reason(lambda: a.submit(task_a, jvp=np.zeros(2, np.float32))) == Reason.DUPLICATE
    b.submit(task_b)
    # After the step is applied: the same result is still a duplicate, a different one still refused.
    assert c.step == 1 and b.submit(task_b).duplicate
    assert reason(lambda: b.submit(task_b, jvp=np.ones(2, np.float32))) == Reason.DUPLICATE
    assert reason(lambda: c.theta_at(9)) == Reason.UNKNOWN_VERSION
    counters = c.store.counters()
    assert counters["accepted"] == 2 and counters["duplicate"] == 2
    c.close()
    # A task its step no longer needed (over-selected, cancelled when the step closed) is stale.
    c, (a, b) = start(tmp_path / "stale", clients=2, run={"clients_per_step": 1, "over_select": 1.0, "min_clients": 2})
    task_a, task_b = a.pull(), b.pull()
    a.submit(task_a)
    assert c.step == 1 and reason(lambda: b.submit(task_b)) == Reason.STALE
    c.close()


def test_variance_control_runs_more_waves_while_the_estimate_is_noisy(tmp_path):
    noisy, devices = start(
        tmp_path / "noisy",
        clients=2,
        run={"steps": 1},
        variance={"mode": "threshold", "threshold": 0.0, "max_waves": 3},
    )
    sent, waves = [], 0
    while not noisy.run.finished:
        assert noisy.run.wave == waves and noisy.step == 0
        first = {d.who.client_id for d in devices if d.pull() is not None}
        assert first == {d.who.client_id for d in devices}  # each wave goes to the same devices: same batches
        sent += run_step(devices)
        waves += 1
    assert waves == 3 and noisy.store.counters()["extra_waves"] == 2
    row = noisy.store.metrics()[-1]
    assert row["waves"] == 3 and row["perturbations"] == 12 and row["variance"] > 0
    np.testing.assert_allclose(noisy.theta, sgd_step(THETA0, sent, 0.05), atol=1e-5)  # all waves, one update

    quiet, devices = start(
        tmp_path / "quiet", clients=2, run={"steps": 1}, variance={"mode": "threshold", "threshold": 1e12}
    )
    run_step(devices)
    assert quiet.run.finished and quiet.store.metrics()[-1]["waves"] == 1


def test_the_sampler_hands_out_the_candidates_most_aligned_with_the_last_estimate(tmp_path):
    c, (device,) = start(tmp_path, clients=1, sampler={"enabled": True, "pool_factor": 5})
    sent = run_step([device])  # step 0 draws plainly
    gradient = sgd_step(np.zeros(LAYOUT.dim), sent, -1.0)  # the step's estimate: mean jvp_i v_i
    task = device.pull()
    assert task.step == 1 and task.explicit
    candidates = [seed_for(1, o) for o in range(10)]
    v = dense_v(candidates)
    cosine = v @ gradient / (np.linalg.norm(v, axis=1) * np.linalg.norm(gradient))
    assert task.seeds.tolist() == [candidates[i] for i in np.argsort(-cosine)[:2]]
    assert c.run.next_ordinal == 10  # the whole pool is consumed: unused candidates are never handed out later
    device.submit(task)
    assert device.pull().seeds.tolist() == [seed_for(2, 0), seed_for(2, 1)]  # even steps draw plainly again


def test_early_stopping_ends_the_run_on_the_best_theta(tmp_path):
    losses = iter([9.0, 1.0, 2.0, 3.0, 0.5])  # θ0 (step -1), then after each step

    def evaluator(theta):
        return {"eval_loss": next(losses)}

    c, (device,) = start(tmp_path, clients=1, evaluator=evaluator, run={"steps": 10}, eval={"every": 1, "patience": 2})
    first = run_step([device])
    best = sgd_step(THETA0, first, 0.05)
    while not c.run.finished:
        run_step([device])
    assert c.step == 3 and c.run.best_version == 2 and c.run.evals_since_best == 2
    np.testing.assert_allclose(c.theta, best, atol=1e-5)  # restored: the θ of the lowest held-out loss
    last = json.loads((tmp_path / "s" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["early_stopped"] and last["restored_version"] == 2
    assert c.pull(device.who).run_finished


def test_the_run_state_is_typed_and_resumes_where_it_was_committed(tmp_path):
    c, devices = start(tmp_path, clients=2)
    run_step(devices)
    devices[0].submit(devices[0].pull())
    state = c.run
    with pytest.raises(AttributeError):
        state.wave_opne  # noqa: B018
    with pytest.raises(AttributeError):
        c.meta("finishd")
    with pytest.raises(TypeError):
        dataclasses.replace(state, finishd=True)
    c.close()
    resumed = Coordinator(tmp_path / "b", tmp_path / "s", c.cfg)
    assert resumed.run == state and resumed.step == 1 and resumed.store.results.count(1, 0) == 1
    np.testing.assert_array_equal(resumed.theta, c.theta)
    resumed.close()
