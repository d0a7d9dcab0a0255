"""Turning a closed step's scalars into the next θ: aggregate, optimise, evaluate, checkpoint, commit.

The next checkpoint file is written first and the step counter advanced after it, in one
transaction with the history record and the metrics row; a crash in between recomputes the same
update from the step's results (kept until that transaction) and overwrites the file.

Early stopping: a forward-gradient run can collapse late, so with ``eval.patience`` the run stops
when that many evaluations in a row did not lower the held-out loss and (``restore_best``) ends
on the best θ seen, kept in ``best.safetensors``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from datetime import UTC, datetime

import numpy as np

from fwdllm.coordinator.aggregation import CleanedScalars, aggregate, clean, default_threads, peer_bound
from fwdllm.coordinator.config import AggregationConfig, CoordinatorConfig
from fwdllm.coordinator.metrics import MetricsLog
from fwdllm.coordinator.optimizer import Optimizer
from fwdllm.coordinator.records import HistoryRecord, Result, RunState
from fwdllm.coordinator.state import Store
from fwdllm.proto import update_rule
from fwdllm.proto.manifest import ThetaLayout
from fwdllm.proto.names import AggregationMethod

log = logging.getLogger("fwdllm.coordinator")

Evaluator = Callable[[np.ndarray], dict]
BEST_FILE = "best.safetensors"


def weighted_loss(results: list[Result], outlier: float) -> float | None:
    """The devices' mean loss, weighted by their examples, without absurd ones.

    A loss is absurd when it is not finite or, among at least ``MIN_PEERS`` results, its magnitude
    exceeds ``outlier`` × the median magnitude: one device must not decide the step's metric."""
    pairs = [(r.loss_mean, max(1, r.num_examples)) for r in results if r.loss_mean is not None]
    pairs = [(loss, n) for loss, n in pairs if math.isfinite(loss)]
    bound = peer_bound([np.array([abs(loss)]) for loss, _ in pairs], outlier)
    if bound is not None:
        pairs = [(loss, n) for loss, n in pairs if abs(loss) <= bound]
    if not pairs:
        return None
    return float(sum(loss * n for loss, n in pairs) / sum(n for _, n in pairs))


def step_scalars(store: Store, step: int, a: AggregationConfig) -> tuple[CleanedScalars, list[Result]]:
    """All of the step's accepted scalars (every wave), cleaned, and the results they came from."""
    results = store.results.of_step(step)
    return clean([(r.seeds, r.jvp) for r in results], a.clip or None, a.outlier, a.client_rms), results


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Updates:
    def __init__(
        self,
        store: Store,
        cfg: CoordinatorConfig,
        layout: ThetaLayout,
        optimizer: Optimizer,
        metrics_log: MetricsLog,
        evaluator: Evaluator | None,
    ):
        self.store, self.cfg, self.layout = store, cfg, layout
        self.optimizer, self.metrics_log, self.evaluator = optimizer, metrics_log, evaluator
        run = store.run
        self.theta, extra = store.load_checkpoint(run.theta_version, layout)
        self.prev_grad: np.ndarray | None = extra.pop("prev_grad", None)  # the sampler's reference
        self.optimizer.load_state(extra)
        self.bytes_down = 0  # this step's downloads: tasks, θ and history

    @property
    def evaluates(self) -> bool:
        return self.evaluator is not None and self.cfg.eval.every > 0

    def record_start(self) -> None:
        """The starting point of the curves: the bundle's θ evaluated, recorded once as step -1."""
        if self.evaluator is not None and self.evaluates and not self.store.metrics():
            row = {"step": -1, "theta_version": 1, "time": now_iso(), **self.evaluator(self.theta)}
            with self.store.transaction():
                self.store.put_metrics(row)
        self.metrics_log.rewrite(self.store.metrics())

    def _metrics_row(self, run: RunState, scalars: CleanedScalars, results: list[Result], info: dict, now: int):
        variances = run.wave_variances or (math.nan,)
        return {
            "step": run.step,
            "theta_version": run.step + 2,
            "time": now_iso(),
            "loss": weighted_loss(results, self.cfg.aggregation.loss_outlier),
            "perturbations": int(scalars.seeds.size),
            "waves": len(variances),
            "variance": variances[-1] if math.isfinite(variances[-1]) else None,
            **info,
            "bytes_up": int(sum(r.bytes_up for r in results)),
            "bytes_down": int(self.bytes_down),
            "step_time_s": (now - run.step_started_ms) / 1000.0,
            "clients_answered": len({r.client_id for r in results}),
            "clients_failed": self.store.tasks.count_expired(run.step),
            "dropped_nonfinite": scalars.dropped_nonfinite,
            "clipped": scalars.clipped,
        }

    def _early_stopping(self, run: RunState, loss, theta: np.ndarray, version: int) -> RunState:
        """Track the best held-out loss; ``evals_since_best`` reaching ``patience`` stops the run."""
        if self.cfg.eval.patience <= 0 or loss is None or not math.isfinite(loss):
            return run
        if run.best_eval_loss is None or loss < run.best_eval_loss:
            self.store.save_named(BEST_FILE, self.layout, theta)
            return dataclasses.replace(run, best_eval_loss=loss, best_version=version, evals_since_best=0)
        return dataclasses.replace(run, evals_since_best=run.evals_since_best + 1)

    @property
    def replayable(self) -> bool:
        """Whether an update is a seeded sum a device can redo: plain SGD without lr groups, ``mean``."""
        return self.optimizer.replayable and self.cfg.aggregation.method == AggregationMethod.MEAN

    def _evaluate(self, run: RunState, theta: np.ndarray, row: dict, last: bool) -> tuple[np.ndarray, RunState, bool]:
        """Evaluate θ when due (into ``row``); early stopping may end the run and put the best θ back."""
        version = run.step + 2
        if self.evaluator is None or not self.evaluates or ((run.step + 1) % self.cfg.eval.every and not last):
            return theta, run, last
        row.update(self.evaluator(theta))
        after = self._early_stopping(run, row.get("eval_loss"), theta, version)
        if self.cfg.eval.patience <= 0 or after.evals_since_best < self.cfg.eval.patience:
            return theta, after, last
        row["early_stopped"] = True
        if self.cfg.eval.restore_best and after.best_version != version:
            theta = self.store.load_named(BEST_FILE, self.layout)
            row["restored_version"] = after.best_version
        return theta, after, True

    def _replayable_step(
        self, run: RunState, scalars: CleanedScalars, spread: float
    ) -> tuple[np.ndarray, np.ndarray, dict, HistoryRecord | None]:
        """(θ, the gradient estimate, the optimiser's plan, the history row) of a plain SGD step.

        θ comes from the update rule applied to the very row recorded, so a device replaying the row
        holds this θ bit for bit; the optimiser's clipping or normalising scale goes into the row's lr.
        One pass over the seeds gives both the estimate (for its norm) and the step."""
        a, n = self.cfg.aggregation, scalars.seeds.size
        coefficients = scalars.jvp / np.float32(max(1, n))
        total = update_rule.seeded_sum(
            scalars.seeds,
            coefficients,
            self.layout.dim,
            self.cfg.run.distribution,
            chunk=a.chunk,
            threads=a.threads or default_threads(),
        )
        grad = total.astype(np.float32)
        info = self.optimizer.plan(grad, run.step, spread)
        lr = float(np.float32(info["lr"] * info["grad_scale"]))
        record = HistoryRecord(run.step + 2, lr, scalars.seeds, coefficients) if n else None
        return update_rule.step(self.theta, total, lr), grad, info, record

    def apply(self, now: int) -> None:
        """Apply the closed step: the update, its evaluation and checkpoint, then the commit of the next step."""
        run, a, r = self.store.run, self.cfg.aggregation, self.cfg.run
        scalars, results = step_scalars(self.store, run.step, a)
        spread = float(np.std(scalars.jvp.astype(np.float64))) if scalars.jvp.size > 1 else math.nan
        record = None
        if self.replayable:
            theta, grad, info, record = self._replayable_step(run, scalars, spread)
        else:
            grad = aggregate(
                scalars,
                self.layout.dim,
                r.distribution,
                method=a.method,
                trim=a.trim,
                chunk=a.chunk,
                threads=a.threads or None,
            )
            theta, info = self.optimizer.apply(self.theta, grad, run.step, jvp_std=spread)
        row = self._metrics_row(run, scalars, results, info, now)
        theta, after, last = self._evaluate(run, theta, row, last=run.step + 1 >= r.steps)
        version = run.step + 2
        extra = {**self.optimizer.state, "prev_grad": grad}
        self.store.save_checkpoint(version, self.layout, theta, extra, self.cfg.server.checkpoints_keep)
        with self.store.transaction():
            if record is not None and "restored_version" not in row:
                self.store.add_history(record, self.cfg.server.history_keep)
            self.store.put_metrics(row)
            self.store.results.delete_step(run.step)
            self.store.save_run(
                dataclasses.replace(
                    after,
                    step=run.step + 1,
                    wave=0,
                    wave_open=False,
                    next_ordinal=0,
                    finished=last,
                    wave_variances=(),
                    step_started_ms=now,
                    step_ready=False,
                )
            )
            self.store.bump("steps")
        self.theta, self.prev_grad, self.bytes_down = theta, grad, 0
        self.metrics_log.append(row)
        log.info(
            "step %d applied: %d perturbations, loss %s, lr %.3g",
            row["step"],
            row["perturbations"],
            row["loss"],
            row["lr"],
        )
