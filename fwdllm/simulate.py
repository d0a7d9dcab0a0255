"""`fwdllm simulate`: a whole federated run on one machine, through real processes over loopback gRPC.

The simulator partitions the data (one JSONL file per client, as real devices get), starts a
real ``fwdllm coordinator serve`` process and a few device worker processes (simulate_worker.py).
Each worker hosts many virtual clients: one real ``DeviceClient`` per client file, all sharing one
backend (runs are serialised by a lock, so a worker uses one core however many clients it
hosts). It shows a progress bar from the coordinator's metrics and ends with a convergence
plot, a Markdown report (simulate_report.py) and the final θ. Studies that need many short runs
without processes use simulate_inprocess.py, which ends on the same θ up to float rounding.

Reproducibility: clients join in a fixed order (worker by worker, client by client) and
keep their ids in per-client state files, the coordinator hands out exactly ``per_step``
tasks per wave and waits for all of them, so client selection, seeds and batches depend on
the seeds alone. Ctrl-C stops every process; the coordinator's state folder and the client
state files are what ``--resume`` continues from.

Run folder: ``sim.json`` (settings), ``data/`` (partition), ``coordinator.json``,
``state/`` (coordinator database, checkpoints, metrics.jsonl), ``devices/`` (client
state), ``logs/``, and at the end ``convergence.png``, ``report.md``, ``theta.safetensors``.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

from fwdllm.errors import UserError
from fwdllm.sim_config import SimConfig
from fwdllm.simulate_report import applied_steps, fmt, metrics_rows, report_markdown

__all__ = ["SimConfig", "Simulation", "simulate"]

SIM_FILE = "sim.json"
#: How long a worker may take to load its backend and join its clients. A decoder's prefix graph is
#: ~500 MB that ONNX Runtime optimises on load: on 2 cores shared with other jobs that took over 300 s.
START_TIMEOUT_S = 900.0


# ---------------------------------------------------------------- the simulator (parent process)


class Simulation:
    def __init__(self, cfg: SimConfig, out: Path):
        self.cfg, self.out = cfg, Path(out)
        self.state, self.data, self.devices, self.logs = (self.out / n for n in ("state", "data", "devices", "logs"))
        self.procs: list[tuple[str, subprocess.Popen]] = []

    # ----- set-up -----
    @classmethod
    def create(cls, cfg: SimConfig, out: Path, options=None) -> Simulation:
        """A new run folder: settings, partition (``options``: how to read the data) and enrolment token."""
        from fwdllm.data.partition import open_federated, write_partition

        cfg.check()
        out = Path(out)
        if (out / SIM_FILE).exists():
            raise UserError(f"{out} already holds a simulation; continue it with --resume or choose a new --out")
        sim = cls(cfg, out)
        fed = open_federated(cfg.data, cfg.clients, alpha=cfg.alpha, seed=cfg.seed, options=options)
        write_partition(fed, sim.data)
        from fwdllm.proto.manifest import load_manifest

        labels = load_manifest(Path(cfg.bundle)).model.labels
        if fed.labels and labels and list(labels) != list(fed.labels):
            raise UserError(
                f"the bundle's labels {labels} differ from the data's {fed.labels}; export with "
                f"--label-names {','.join(fed.labels)}"
            )
        (out / SIM_FILE).write_text(
            json.dumps({"config": asdict(cfg), "token": secrets.token_hex(24), "wall_s": 0.0}, indent=1) + "\n"
        )
        return sim

    @classmethod
    def resume(cls, out: Path) -> Simulation:
        out = Path(out)
        if not (out / SIM_FILE).exists():
            raise UserError(f"{out} holds no simulation to resume (no {SIM_FILE}); start one without --resume")
        saved = json.loads((out / SIM_FILE).read_text())["config"]
        return cls(SimConfig(**{f.name: saved[f.name] for f in fields(SimConfig) if f.name in saved}), out)

    def _meta(self) -> dict:
        return json.loads((self.out / SIM_FILE).read_text())

    # ----- processes -----
    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "a")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        # A session of its own: Ctrl-C reaches the simulator only, which then stops the children in order.
        proc = subprocess.Popen(
            [sys.executable, *args], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        self.procs.append((name, proc))
        return proc

    def _wait_for(self, path: Path, proc: subprocess.Popen, name: str) -> None:
        start = time.monotonic()
        while not path.exists():
            if proc.poll() is not None:
                raise UserError(
                    f"the {name} process exited (code {proc.returncode}) while starting; see {self.logs / name}.log"
                )
            if time.monotonic() - start > START_TIMEOUT_S:
                raise UserError(
                    f"the {name} process did not start within {START_TIMEOUT_S:.0f} s; see {self.logs / name}.log"
                )
            time.sleep(0.1)

    def _start(self) -> str:
        cfg, meta = self.cfg, self._meta()
        config_file = self.out / "coordinator.json"
        config_file.write_text(json.dumps(cfg.coordinator_config(self.data / "heldout.jsonl"), indent=1) + "\n")
        self.state.mkdir(parents=True, exist_ok=True)
        (self.state / "endpoint").unlink(missing_ok=True)
        coord = self._spawn(
            "coordinator",
            [
                "-m",
                "fwdllm.cli",
                "coordinator",
                "serve",
                "--bundle",
                cfg.bundle,
                "--state",
                str(self.state),
                "--port",
                "0",
                "--config",
                str(config_file),
                f"--token={meta['token']}",
                "--exit-when-finished",
            ],
        )
        self._wait_for(self.state / "endpoint", coord, "coordinator")
        address = f"127.0.0.1:{(self.state / 'endpoint').read_text().strip()}"
        self.devices.mkdir(parents=True, exist_ok=True)
        bounds = [round(i * cfg.clients / cfg.workers) for i in range(cfg.workers + 1)]
        for k in range(cfg.workers):
            ready = self.devices / f"worker-{k}.ready"
            ready.unlink(missing_ok=True)
            worker = self._spawn(
                f"worker-{k}",
                [
                    "-m",
                    "fwdllm.simulate_worker",
                    "--coordinator",
                    address,
                    "--bundle",
                    cfg.bundle,
                    "--partition",
                    str(self.data),
                    "--first",
                    str(bounds[k]),
                    "--count",
                    str(bounds[k + 1] - bounds[k]),
                    f"--token={meta['token']}",
                    "--devices",
                    str(self.devices),
                    "--backend",
                    cfg.backend,
                    "--ready",
                    str(ready),
                ],
            )
            self._wait_for(ready, worker, f"worker-{k}")  # in order: the coordinator sees a fixed join order
        return address

    def _stop(self, timeout: float = 30.0) -> None:
        """SIGTERM every child (workers first, so no device is left waiting), then wait; SIGKILL stragglers."""
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _, proc in reversed(self.procs):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    # ----- the run -----
    def run(self, progress: bool = True) -> dict:
        if self.cfg.engine == "flower":
            from fwdllm.flower.simulation import run_engine

            started = time.monotonic()
            try:
                run_engine(self)
            finally:
                self._add_wall(time.monotonic() - started)
            return self.finish()
        return self._run_processes(progress)

    def _add_wall(self, seconds: float) -> None:
        meta = self._meta()
        meta["wall_s"] = float(meta.get("wall_s", 0.0)) + seconds
        (self.out / SIM_FILE).write_text(json.dumps(meta, indent=1) + "\n")

    def _run_processes(self, progress: bool) -> dict:
        from tqdm import tqdm

        metrics = self.state / "metrics.jsonl"
        started = time.monotonic()
        bar = tqdm(total=self.cfg.steps, desc="simulate", unit="step", disable=not progress)
        try:
            self._start()
            coordinator = self.procs[0][1]
            while True:
                rows = applied_steps(metrics_rows(metrics))
                if len(rows) > bar.n:
                    last_eval: dict = next((r for r in reversed(rows) if r.get("accuracy") is not None), {})
                    bar.set_postfix(loss=fmt(rows[-1].get("loss")), acc=fmt(last_eval.get("accuracy")), refresh=False)
                    bar.update(len(rows) - bar.n)
                if coordinator.poll() is not None:
                    break
                dead = [n for n, p in self.procs[1:] if p.poll() not in (None, 0)]
                if dead:
                    raise UserError(f"device process {dead[0]} failed; see {self.logs / dead[0]}.log")
                time.sleep(0.5)
            if coordinator.returncode != 0:
                raise UserError(
                    f"the coordinator exited with code {coordinator.returncode}; see {self.logs}/coordinator.log"
                )
            for name, proc in self.procs[1:]:
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    logging.getLogger("fwdllm.simulate").warning("%s did not leave after the run; stopping it", name)
        finally:
            bar.close()
            self._stop()
            self._add_wall(time.monotonic() - started)
        return self.finish()

    def finish(self) -> dict:
        """Final θ, plot and report from the coordinator's state."""
        from fwdllm.coordinator.metrics import plot
        from fwdllm.coordinator.state import Store
        from fwdllm.proto.manifest import load_manifest, save_theta

        all_rows = metrics_rows(self.state / "metrics.jsonl")
        rows = applied_steps(all_rows)
        if not rows:
            raise UserError(f"the run in {self.out} has applied no step yet; see {self.logs}/coordinator.log")
        initial = next((r for r in all_rows if r["step"] < 0), {})  # the coordinator evaluates θ0 as step -1
        manifest = load_manifest(Path(self.cfg.bundle))
        store = Store(self.state)
        try:
            theta, _ = store.load_checkpoint(len(rows) + 1, manifest.theta)
        finally:
            store.close()
        save_theta(self.out / "theta.safetensors", manifest.theta, theta)
        png = plot(
            all_rows,
            self.out / "convergence.png",
            title=f"{self.cfg.data}: {self.cfg.clients} clients, {self.cfg.per_step} per step",
        )
        after: dict = next(
            (r for r in reversed(rows) if r.get("accuracy") is not None or r.get("eval_loss") is not None), {}
        )
        summary = {
            "steps": len(rows),
            "before": {k: initial.get(k) for k in ("accuracy", "eval_loss") if initial.get(k) is not None},
            "after": {k: after.get(k) for k in ("accuracy", "eval_loss") if after.get(k) is not None},
            "bytes_up": int(sum(r.get("bytes_up", 0) for r in rows)),
            "bytes_down": int(sum(r.get("bytes_down", 0) for r in rows)),
            "perturbations": int(sum(r.get("perturbations", 0) for r in rows)),
            "wall_s": self._meta()["wall_s"],
            "plot": str(png),
            "report": str(self.out / "report.md"),
            "theta": str(self.out / "theta.safetensors"),
        }
        (self.out / "report.md").write_text(report_markdown(self.cfg, summary, all_rows))
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        return summary


def simulate(cfg: SimConfig | None, out: Path, resume: bool = False, progress: bool = True, options=None) -> dict:
    """Start (or with ``resume`` continue) a simulation in ``out``; returns its summary."""
    if resume:
        sim = Simulation.resume(out)
    elif cfg is not None:
        sim = Simulation.create(cfg, out, options)
    else:
        raise ValueError("a new simulation needs its SimConfig; only resume=True goes without")
    # SIGTERM takes Ctrl-C's path, so the coordinator and workers (own sessions) are stopped too.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return sim.run(progress)
    except KeyboardInterrupt:
        print(f"stopped; continue with: fwdllm simulate --out {out} --resume", file=sys.stderr)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt
