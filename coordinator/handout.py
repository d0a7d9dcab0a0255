"""Handing out tasks: which clients a wave picks, which seeds each task gets, and a device's pull.

Seeds are ``seed_for(step, ordinal)``; the ordinal counter is saved with the task, in the same
transaction, before the device sees it, and the sampler's unused candidates consume ordinals too,
so no seed is ever handed out twice, across restarts included.
"""

from __future__ import annotations

import dataclasses
import math
import uuid

import numpy as np

from fwdllm.coordinator import sampler
from fwdllm.coordinator.config import CoordinatorConfig
from fwdllm.coordinator.messages import Pulled, Reason, Reject, TaskOffer
from fwdllm.coordinator.records import Candidate, Task
from fwdllm.coordinator.state import Store
from fwdllm.proto.perturbation import seed_for

SEED_SPACE = 1 << 32


def select_clients(candidates: list[Candidate], k: int, cfg: CoordinatorConfig, step: int, wave: int) -> list[str]:
    """k of the candidates, reproducibly per (run seed, step, wave): uniformly, or ``weighted`` by
    reliability (Laplace-smoothed answered share) times sqrt(cpu count)."""
    if k >= len(candidates):
        return [c.client_id for c in candidates]
    rng = np.random.default_rng([cfg.run.seed, step, wave])
    if cfg.run.selection == "weighted":
        weights = np.array(
            [(c.answered + 1) / (c.answered + c.failed + 2) * math.sqrt(max(1, c.cpu_count)) for c in candidates]
        )
    else:
        weights = np.ones(len(candidates))
    picked = rng.choice(len(candidates), size=k, replace=False, p=weights / weights.sum())
    return [candidates[i].client_id for i in sorted(picked)]


class Handout:
    def __init__(self, store: Store, cfg: CoordinatorConfig):
        self.store, self.cfg = store, cfg

    def issue_count(self) -> int:
        """Tasks per wave: ``clients_per_step`` plus the over-selection that absorbs stragglers."""
        return math.ceil(self.cfg.run.clients_per_step * (1 + self.cfg.run.over_select))

    def _draw_seeds(self, k: int, prev_grad: np.ndarray | None) -> tuple[np.ndarray, bool]:
        """k fresh seeds of this step, and whether the sampler chose them; saves the consumed ordinals."""
        run = self.store.run
        use_sampler = self.cfg.sampler.enabled and sampler.samples_this_step(run.step) and prev_grad is not None
        drawn = k * self.cfg.sampler.pool_factor if use_sampler else k
        if run.next_ordinal + drawn >= SEED_SPACE:
            raise Reject(Reason.SEED_SPACE, "this step has used all 2^32 seeds")
        ordinals = range(run.next_ordinal, run.next_ordinal + drawn)
        seeds = np.array([seed_for(run.step, o) for o in ordinals], dtype=np.uint64)
        if use_sampler and prev_grad is not None:  # use_sampler implies a previous gradient
            threads = self.cfg.aggregation.threads or None
            seeds, _ = sampler.select(seeds, prev_grad, k, self.cfg.run.distribution, threads=threads)
        self.store.save_run(dataclasses.replace(run, next_ordinal=run.next_ordinal + drawn))
        return seeds, use_sampler

    def create(self, client_id: str, prev_grad: np.ndarray | None, now: int) -> Task:
        """A task of the open wave for ``client_id``, inside the caller's transaction."""
        run, r = self.store.run, self.cfg.run
        seeds, explicit = self._draw_seeds(r.perturbations_per_client, prev_grad)
        task = Task(
            task_id=f"t{run.step}-{run.wave}-{uuid.uuid4().hex[:12]}",
            step=run.step,
            wave=run.wave,
            client_id=client_id,
            seeds=seeds,
            explicit=explicit,
            batch_start=run.step * r.batch_size,
            batch_size=r.batch_size,
            deadline_ms=now + int(r.deadline_s * 1000),
            status="open",
        )
        self.store.tasks.add(task)
        self.store.bump("tasks_issued")
        return task

    def offer(self, task: Task) -> TaskOffer:
        r = self.cfg.run
        return TaskOffer(task=task, distribution=r.distribution, scheme=r.scheme, epsilon=r.epsilon)

    def pull(self, client_id: str, prev_grad: np.ndarray | None, now: int) -> Pulled:
        """The client's task of the open wave: the one it holds, or a new one while slots are free."""
        run = self.store.run
        retry = Pulled(retry_after_ms=self.cfg.server.retry_ms)
        mine = self.store.tasks.live_of(client_id, run.step, run.wave)
        if mine is not None:
            return retry if mine.status == "accepted" else Pulled(offer=self.offer(mine))
        if self.store.tasks.count_live(run.step, run.wave) >= self.issue_count():
            return retry
        with self.store.transaction():
            task = self.create(client_id, prev_grad, now)
        return Pulled(offer=self.offer(task))
