"""Liveness: a device that takes a task and goes silent is not waited for until the deadline.

Its task expires once it missed a heartbeat interval (``server.silent_after_beats`` intervals
without a call), the slot goes to the next device that pulls, and the silent device is left out
of selection until it pulls again. A device that keeps beating while it computes keeps its task.
"""

from __future__ import annotations

import time

from test_coordinator_core import Device, run_step, start

HEARTBEAT_MS = 200


def test_a_silent_holder_loses_its_task_within_a_heartbeat_interval_and_is_not_selected(tmp_path):
    c, devices = start(
        tmp_path,
        clients=3,
        run={"clients_per_step": 2, "min_clients": 2, "deadline_s": 30},
        server={"heartbeat_ms": HEARTBEAT_MS},
    )
    tasks = {d: d.pull() for d in devices}
    (silent, working), (idle,) = [d for d, t in tasks.items() if t], [d for d, t in tasks.items() if not t]
    went_silent = time.monotonic()
    for _ in range(3):  # the working device beats while it computes, for longer than the silent limit
        time.sleep(HEARTBEAT_MS / 1000)
        c.heartbeat(working.who)
        c.tick()
    working.submit(tasks[working])
    while c.step == 0:
        assert time.monotonic() - went_silent < 5, "the wave waited for the silent device"
        c.tick()
        task = idle.pull()  # the freed slot goes to the next device that pulls
        if task is not None:
            idle.submit(task)
        time.sleep(0.02)
    assert time.monotonic() - went_silent < 3 * HEARTBEAT_MS / 1000 + 2.0  # not the 30 s deadline
    assert c.store.counters()["tasks_abandoned"] == 1 and "tasks_expired" not in c.store.counters()
    # Step 1 picks the two that ask for work: its wave opens once both have pulled.
    first = idle.pull()
    assert working.pull() is not None and (first or idle.pull()) is not None
    assert silent.who.client_id in c.registry.silenced
    assert silent.pull() is None  # asking for work again: no slot is free, but it is selectable again
    assert not c.registry.silenced
    c.close()


def test_silence_can_be_switched_off(tmp_path):
    c, devices = start(
        tmp_path,
        clients=2,
        run={"clients_per_step": 2, "min_clients": 2},
        server={"heartbeat_ms": 50, "silent_after_beats": 0},
    )
    tasks = [d.pull() for d in devices]
    time.sleep(0.3)
    c.tick()
    for d, task in zip(devices, tasks):
        assert not d.submit(task).duplicate
    assert c.step == 1 and "tasks_abandoned" not in c.store.counters()
    c.close()


def test_1000_joined_devices_that_sit_idle_are_never_handed_a_task(tmp_path):
    """Selection considers only devices asking for work (a Join or a pull within the silence limit): a
    device that joined and then never pulled would otherwise hold a slot each step until it fell silent."""
    c, working = start(
        tmp_path,
        clients=3,
        run={"steps": 5, "over_select": 0.5, "deadline_s": 3600},
        server={"heartbeat_ms": HEARTBEAT_MS},
    )
    idle = [Device(c, 100 + i) for i in range(1000)]
    time.sleep(3 * HEARTBEAT_MS / 1000)  # past the silence limit since their Join: no longer asking for work
    for _ in range(1000):
        if c.run.finished:
            break
        run_step(working)
        c.tick()
    assert c.run.finished
    holders = {client_id for (client_id,) in c.store.query("SELECT DISTINCT client_id FROM tasks")}
    assert holders == {d.who.client_id for d in working}
    assert len(idle) == 1000 and "tasks_abandoned" not in c.store.counters()
    c.close()
