"""Round mechanics without the network: over-selection, deadlines, stragglers, leaving, selection, versions."""

from __future__ import annotations

import json
import time

import grpc
import numpy as np
import pytest
from test_coordinator_fixtures import dense_v, make_bundle, task_seeds

from fwdllm.coordinator.config import from_dict
from fwdllm.coordinator.handout import select_clients
from fwdllm.coordinator.messages import Reject
from fwdllm.coordinator.rounds import Coordinator
from fwdllm.coordinator.server import GRPC_STATUS
from fwdllm.coordinator.updates import Updates
from fwdllm.coordinator.wire import ProtoCoordinator
from fwdllm.proto.v1 import fwdllm_pb2 as pb


def setup(tmp_path, run: dict, clients: int = 3, **sections):
    cfg = from_dict(
        {
            "run": {"steps": 3, "perturbations_per_client": 2, "deadline_s": 30, **run},
            "aggregation": {"threads": 1},
            **sections,
        }
    )
    c = Coordinator(make_bundle(tmp_path / "b"), tmp_path / "s", cfg)
    c.store.add_token("tok")
    ids = []
    for i in range(clients):
        r = ProtoCoordinator(c).join(
            pb.JoinRequest(
                protocol_version=pb.PROTOCOL_VERSION_1,
                enrolment_token="tok",
                model_fingerprint=c.fingerprint,
                capabilities=pb.Capabilities(cpu_count=1 + 3 * i),
            )
        )
        ids.append((r.client_id, r.session_token, r.client_secret))
    return c, ids


def pull(c, ident):
    return ProtoCoordinator(c).pull_task(pb.PullTaskRequest(client_id=ident[0], session_token=ident[1]))


def submit(c, ident, task, value=0.5):
    seeds = task_seeds(task)
    return ProtoCoordinator(c).submit(
        pb.SubmitRequest(
            client_id=ident[0],
            session_token=ident[1],
            task_id=task.task_id,
            step=task.step,
            seeds=seeds,
            jvp=[value] * len(seeds),
            loss=pb.LossStats(mean=1.0),
            num_examples=8,
        ),
        100,
    )


def reject_code(fn) -> grpc.StatusCode:
    with pytest.raises(Reject) as info:
        fn()
    return GRPC_STATUS[info.value.reason]


def test_over_selection_cancels_the_extra_task(tmp_path):
    c, ids = setup(tmp_path, {"clients_per_step": 2, "over_select": 0.5, "min_clients": 3})
    tasks = [pull(c, i).task for i in ids]
    assert all(t.task_id for t in tasks) and len({t.task_id for t in tasks}) == 3
    submit(c, ids[0], tasks[0]), submit(c, ids[1], tasks[1])
    assert c.step == 1
    beat = ProtoCoordinator(c).heartbeat(pb.HeartbeatRequest(client_id=ids[2][0], session_token=ids[2][1]))
    assert tasks[2].task_id in beat.cancel_task_ids
    assert reject_code(lambda: submit(c, ids[2], tasks[2])) == grpc.StatusCode.FAILED_PRECONDITION


def test_deadline_closes_a_wave_with_the_results_that_arrived(tmp_path):
    c, ids = setup(tmp_path, {"clients_per_step": 3, "over_select": 0.0, "min_clients": 3, "deadline_s": 0.2})
    tasks = [pull(c, i).task for i in ids]
    submit(c, ids[0], tasks[0], value=2.0)
    time.sleep(0.3)
    c.tick()
    assert c.step == 1
    row = c.store.query("SELECT row FROM metrics")[0][0]
    assert '"perturbations": 2' in row and '"clients_failed": 2' in row
    # The update used exactly the one result: theta0 - lr * mean(2.0 * v).
    theta0 = np.linspace(-1, 1, c.dim, dtype=np.float32).astype(np.float64)
    want = theta0 - 0.01 * (2.0 * dense_v(task_seeds(tasks[0]))).mean(axis=0)
    np.testing.assert_allclose(c.theta, want, atol=1e-6)
    assert reject_code(lambda: submit(c, ids[1], tasks[1])) == grpc.StatusCode.FAILED_PRECONDITION


def test_stragglers_expire_and_their_slots_are_handed_out_again(tmp_path):
    c, ids = setup(
        tmp_path,
        {"clients_per_step": 2, "over_select": 0.0, "min_clients": 2, "min_results": 2, "deadline_s": 0.2},
        clients=3,
    )
    first = [pull(c, i) for i in ids]
    holders = [i for i, r in zip(ids, first) if r.WhichOneof("outcome") == "task"]
    idle = [i for i, r in zip(ids, first) if r.WhichOneof("outcome") != "task"]
    assert len(holders) == 2 and len(idle) == 1
    submit(c, holders[0], [r.task for r in first if r.WhichOneof("outcome") == "task"][0])
    time.sleep(0.3)
    c.tick()  # one result < min_results: the overdue task expires and the wave waits longer
    assert c.step == 0 and c.store.counters()["tasks_expired"] == 1 and c.store.counters()["waves_extended"] == 1
    late = pull(c, idle[0]).task  # the freed slot goes to another client
    submit(c, idle[0], late)
    assert c.step == 1


def test_leaving_frees_the_task_and_needs_a_new_join(tmp_path):
    c, ids = setup(tmp_path, {"clients_per_step": 1, "over_select": 0.0, "min_clients": 1}, clients=2)
    replies = [pull(c, i) for i in ids]
    assert sorted(r.WhichOneof("outcome") for r in replies) == ["retry_after_ms", "task"]
    holder, other = (ids[0], ids[1]) if replies[0].WhichOneof("outcome") == "task" else (ids[1], ids[0])
    task = replies[ids.index(holder)].task
    ProtoCoordinator(c).leave(pb.LeaveRequest(client_id=holder[0], session_token=holder[1]))
    assert pull(c, other).WhichOneof("outcome") == "task"
    assert reject_code(lambda: submit(c, holder, task)) == grpc.StatusCode.UNAUTHENTICATED
    again = ProtoCoordinator(c).join(
        pb.JoinRequest(
            protocol_version=pb.PROTOCOL_VERSION_1,
            enrolment_token="tok",
            model_fingerprint=c.fingerprint,
            previous_client_id=holder[0],
            client_secret=holder[2],
        )
    )
    assert again.client_id == holder[0] and not again.client_secret


def test_weighted_selection_prefers_reliable_clients(tmp_path):
    c, ids = setup(tmp_path, {"selection": "weighted"}, clients=2)
    with c.store.transaction() as db:
        db.execute("UPDATE clients SET answered=50, failed=0 WHERE client_id=?", (ids[0][0],))
        db.execute("UPDATE clients SET answered=0, failed=50 WHERE client_id=?", (ids[1][0],))
    candidates = c.store.active_clients()
    picks = [select_clients(candidates, 1, c.cfg, c.step, wave)[0] for wave in range(200)]
    assert picks.count(ids[0][0]) > 170


def test_old_theta_versions_are_served_from_checkpoints(tmp_path):
    c, ids = setup(tmp_path, {"clients_per_step": 1, "over_select": 0.0, "steps": 2}, clients=1)
    for _ in range(2):
        submit(c, ids[0], pull(c, ids[0]).task)
    assert c.theta_version == 3
    v1 = c.theta_at(1)[1]
    np.testing.assert_array_equal(v1, np.linspace(-1, 1, c.dim, dtype=np.float32))
    assert c.theta_at(0)[0] == 3
    assert reject_code(lambda: c.theta_at(9)) == grpc.StatusCode.NOT_FOUND
    assert pull(c, ids[0]).run_finished


def test_early_stopping_ends_on_the_best_theta(tmp_path):
    script = iter([5.0, 3.0, 2.0, 2.5, 2.6, 1.0])  # the first is the initial theta (step -1)
    seen = []

    def evaluator(theta):
        seen.append(theta.copy())
        return {"eval_loss": next(script), "accuracy": 0.5}

    cfg = from_dict(
        {
            "run": {"steps": 10, "clients_per_step": 1, "over_select": 0.0},
            "eval": {"every": 1, "patience": 2},
            "aggregation": {"threads": 1},
        }
    )
    c = Coordinator(make_bundle(tmp_path / "b"), tmp_path / "s", cfg, evaluator=evaluator)
    c.store.add_token("tok")
    r = ProtoCoordinator(c).join(
        pb.JoinRequest(protocol_version=pb.PROTOCOL_VERSION_1, enrolment_token="tok", model_fingerprint=c.fingerprint)
    )
    ident = (r.client_id, r.session_token)
    while not (reply := pull(c, ident)).run_finished:
        submit(c, ident, reply.task, value=1.0)
    assert c.step == 4 and len(seen) == 5  # stopped after two evaluations without improvement
    np.testing.assert_array_equal(c.theta, seen[2])  # the best (eval_loss 2.0) theta is the final one
    np.testing.assert_array_equal(c.theta_at(5)[1], seen[2])
    last = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["early_stopped"] and last["restored_version"] == 3


def test_a_crash_between_the_decision_and_the_update_applies_it_on_restart(tmp_path, monkeypatch):
    c, ids = setup(tmp_path, {"clients_per_step": 2, "over_select": 0.0, "min_clients": 2}, clients=2)
    tasks = [pull(c, i).task for i in ids]
    submit(c, ids[0], tasks[0], value=1.0)

    def crash(self, now):
        raise KeyboardInterrupt("killed before the update was written")

    monkeypatch.setattr(Updates, "apply", crash)
    with pytest.raises(KeyboardInterrupt):
        submit(c, ids[1], tasks[1], value=-1.0)
    issued = c.store.counters()["tasks_issued"]
    c.close()
    monkeypatch.undo()
    restarted = Coordinator(tmp_path / "b", tmp_path / "s", c.cfg)
    restarted.tick()
    assert restarted.step == 1 and restarted.store.counters()["tasks_issued"] == issued  # no wave was reopened
    v = dense_v(task_seeds(tasks[0]) + task_seeds(tasks[1]))
    want = np.linspace(-1, 1, c.dim, dtype=np.float32) - 0.01 * (np.array([1, 1, -1, -1]) @ v) / 4
    np.testing.assert_allclose(restarted.theta, want, atol=1e-6)


def test_init_theta_takes_tensors_by_name_once(tmp_path):
    from test_coordinator_fixtures import LAYOUT

    from fwdllm.errors import UserError
    from fwdllm.proto.manifest import ThetaLayout, save_theta

    head = ThetaLayout.from_shapes([("classifier.weight", (3, 12)), ("classifier.bias", (3,)), ("other.bias", (5,))])
    trained = np.arange(head.dim, dtype=np.float32)
    save_theta(tmp_path / "head.safetensors", head, trained)
    c, _ = setup(tmp_path, {"init_theta": str(tmp_path / "head.safetensors")}, clients=1)
    bundle_theta = np.linspace(-1, 1, LAYOUT.dim, dtype=np.float32)
    slots = {s.name: s for s in LAYOUT.tensors}
    enc, w, b = slots["encoder.layer.0.bias"], slots["classifier.weight"], slots["classifier.bias"]
    np.testing.assert_array_equal(c.theta[enc.offset : enc.offset + enc.size], bundle_theta[: enc.size])
    np.testing.assert_array_equal(c.theta[w.offset : w.offset + w.size], trained[:36])
    np.testing.assert_array_equal(c.theta[b.offset : b.offset + b.size], trained[36:39])
    c.close()
    # a restart resumes from its checkpoint: the file is read at the start of a run only
    resumed = Coordinator(tmp_path / "b", tmp_path / "s", from_dict({"run": {"init_theta": str(tmp_path / "gone")}}))
    np.testing.assert_array_equal(resumed.theta, c.theta)
    resumed.close()

    wrong = ThetaLayout.from_shapes([("classifier.weight", (4, 12))])
    save_theta(tmp_path / "wrong.safetensors", wrong, np.zeros(wrong.dim, dtype=np.float32))
    unrelated = ThetaLayout.from_shapes([("lm_head.bias", (3,))])
    save_theta(tmp_path / "unrelated.safetensors", unrelated, np.zeros(3, dtype=np.float32))
    for name, message in [
        ("wrong", r"has shape \[4, 12\]"),
        ("unrelated", "shares no tensor name"),
        ("missing", "does not exist"),
    ]:
        with pytest.raises(UserError, match=message):
            Coordinator(
                make_bundle(tmp_path / f"b-{name}"),
                tmp_path / f"s-{name}",
                from_dict({"run": {"init_theta": str(tmp_path / f"{name}.safetensors")}}),
            )
