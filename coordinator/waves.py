"""Waves of a step and the decision that ends it: another wave (variance control) or the update.

A step perturbs θ version ``step + 1`` on the batch ``[step * batch_size, +batch_size)`` of every
device. A wave hands ``ceil(clients_per_step * (1 + over_select))`` tasks and closes when
``clients_per_step`` results arrived, or at its deadline with at least ``min_results``. Variance
control may then ask for another wave on the same batch; otherwise the step's scalars (all
waves) become one update (updates.py). The decision is committed before the update is applied,
so a crash in between resumes by applying it, never by reopening the closed wave.
"""

from __future__ import annotations

import dataclasses
import logging
import math

from fwdllm.coordinator.aggregation import CleanedScalars, split_half_variance
from fwdllm.coordinator.config import CoordinatorConfig
from fwdllm.coordinator.handout import Handout, select_clients
from fwdllm.coordinator.records import RunState
from fwdllm.coordinator.registry import Registry
from fwdllm.coordinator.state import Store
from fwdllm.coordinator.updates import Updates, step_scalars
from fwdllm.errors import UserError
from fwdllm.proto.manifest import ThetaLayout
from fwdllm.proto.names import VarianceMode

log = logging.getLogger("fwdllm.coordinator")


def probe_range(cfg: CoordinatorConfig, layout: ThetaLayout) -> tuple[int, int]:
    """The θ slice whose split-half variance variance control measures."""
    probe = cfg.variance.probe
    if probe == "all":
        return 0, layout.dim
    for slot in layout.tensors:
        if slot.name == probe:
            return slot.offset, slot.offset + slot.size
    raise UserError(
        f'variance.probe {probe!r} is not a theta tensor; use "all" or one of {[s.name for s in layout.tensors][:10]}'
    )


class Waves:
    def __init__(
        self,
        store: Store,
        cfg: CoordinatorConfig,
        layout: ThetaLayout,
        registry: Registry,
        handout: Handout,
        updates: Updates,
    ):
        self.store, self.cfg, self.dim = store, cfg, layout.dim
        self.registry, self.handout, self.updates = registry, handout, updates
        self.probe = probe_range(cfg, layout)
        self.slots_freed = 0  # tasks expired since start: each frees a slot for the next device that pulls

    def advance(self, now: int) -> None:
        """Apply a decided step, expire overdue tasks, close a finished wave, open the next one."""
        if self.store.run.step_ready:  # decided before a crash, not yet applied
            self.updates.apply(now)
            if self.store.run.finished:
                return
        run, r = self.store.run, self.cfg.run
        if run.wave_open:
            self._expire_lost(run.step, now)
            accepted = self.store.results.count(run.step, run.wave)
            due = now >= run.wave_deadline_ms
            if accepted >= r.clients_per_step or (due and accepted >= r.min_results):
                self.close(now)
            elif due:
                with self.store.transaction():
                    self.store.save_run(dataclasses.replace(run, wave_deadline_ms=now + int(r.deadline_s * 1000)))
                    self.store.bump("waves_extended")
        if not self.store.run.wave_open and not self.store.run.finished:
            self.open(now)

    def _expire_lost(self, step: int, now: int) -> None:
        """Expire open tasks past their deadline, and at once those whose holder went silent (their
        slots go to the next clients that pull; the silent ones are not selected until they pull)."""
        tasks = self.store.tasks.open_of(step)
        silent = self.registry.silent({t.client_id for t in tasks}, now)
        overdue = [t for t in tasks if t.deadline_ms < now]
        abandoned = [t for t in tasks if t.deadline_ms >= now and t.client_id in silent]
        if not overdue and not abandoned:
            return
        with self.store.transaction():
            for task in overdue + abandoned:
                self.store.tasks.expire(task)
            if overdue:
                self.store.bump("tasks_expired", len(overdue))
            if abandoned:
                self.store.bump("tasks_abandoned", len(abandoned))
        self.slots_freed += len(overdue) + len(abandoned)
        if abandoned:
            self.registry.silence({t.client_id for t in abandoned})
            log.info("step %d: %d silent holders lost their tasks", step, len(abandoned))

    def open(self, now: int) -> None:
        """Open a wave once enough clients are active, creating the selected clients' tasks at once."""
        if self.registry.count_active(now) < self.cfg.run.min_clients:
            return  # counted in memory: every pull tries this while devices are still joining
        active = self.registry.active(now)
        if not active or len(active) < self.cfg.run.min_clients:
            return
        run = self.store.run
        if run.wave > 0:  # the same devices again, so the extra wave sees the same batches
            answered = self.store.results.clients_of(run.step)
            preferred = [c for c in active if c.client_id in answered]
            active = preferred if len(preferred) >= self.cfg.run.min_results else active
        chosen = select_clients(active, self.handout.issue_count(), self.cfg, run.step, run.wave)
        with self.store.transaction():
            deadline = now + int(self.cfg.run.deadline_s * 1000)
            self.store.save_run(dataclasses.replace(run, wave_open=True, wave_deadline_ms=deadline))
            for client_id in chosen:
                self.handout.create(client_id, self.updates.prev_grad, now)

    def _variance(self, scalars: CleanedScalars) -> float:
        if self.cfg.variance.mode not in (VarianceMode.THRESHOLD, VarianceMode.RELATIVE):
            return math.nan
        a = self.cfg.aggregation
        return split_half_variance(
            scalars, self.dim, self.cfg.run.distribution, *self.probe, chunk=a.chunk, threads=a.threads or None
        )

    def _decide(self, run: RunState, variance: float) -> tuple[bool, float | None]:
        """Whether the step needs another wave, and step 0's reference variance (mode relative)."""
        vc, var0 = self.cfg.variance, run.var0
        if vc.mode == VarianceMode.FIXED:
            return run.wave + 1 < vc.fixed_waves, var0
        if vc.mode in (VarianceMode.THRESHOLD, VarianceMode.RELATIVE) and run.wave + 1 < vc.max_waves:
            if vc.mode == VarianceMode.THRESHOLD:
                return variance > vc.threshold, var0
            if var0 is None:  # mode relative: step 0's variance becomes the reference
                var0 = variance
            return variance > vc.relative * var0, var0
        return False, var0

    def close(self, now: int) -> None:
        """Decide between another wave and the update, and commit that decision at once."""
        run = self.store.run
        scalars, _ = step_scalars(self.store, run.step, self.cfg.aggregation)
        variance = self._variance(scalars)
        more, var0 = self._decide(run, variance)
        closed = dataclasses.replace(
            run,
            wave_open=False,
            wave_variances=(*run.wave_variances, variance),
            var0=var0 if var0 is None or math.isfinite(var0) else None,
            wave=run.wave + 1 if more else run.wave,
            step_ready=not more,
        )
        with self.store.transaction():
            self.store.bump("tasks_cancelled", self.store.tasks.cancel_open(run.step))
            self.store.save_run(closed)
            if more:
                self.store.bump("extra_waves")
        if more:
            log.info("step %d wave %d: variance %.3g above the limit, another wave", run.step, run.wave, variance)
            return
        self.updates.apply(now)
