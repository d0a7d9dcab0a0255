"""Liveness: a device that takes a task and goes silent is not waited for until the deadline.

Its task expires once it missed a heartbeat interval (``server.silent_after_beats`` intervals
without a call), the slot goes to the next device that pulls, and the silent device is left out
of selection until it pulls again. A device that keeps beating while it computes keeps its task.
"""

from __future__ import annotations

import time

from test_coordinator_core import start

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
    assert idle.pull() is not None and working.pull() is not None  # step 1 picks the two that answer
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
