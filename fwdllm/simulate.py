"""`fwdllm simulate`: a whole federated run on one machine, through real processes over loopback gRPC.

The simulator partitions the data (one JSONL file per client, as real devices get), starts a
real ``fwdllm coordinator serve`` process and a few device worker processes. Each worker
hosts many virtual clients: one real ``DeviceClient`` per client file, all sharing one
backend (runs are serialised by a lock, so a worker uses one core however many clients it
hosts). It shows a progress bar from the coordinator's metrics and ends with a convergence
plot, a Markdown report and the final θ.

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

import argparse
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from fwdllm.errors import UserError

SIM_FILE = "sim.json"
#: How long a worker may take to load its backend and join its clients. A decoder's prefix graph is
#: ~500 MB that ONNX Runtime optimises on load: on 2 cores shared with other jobs that took over 300 s.
START_TIMEOUT_S = 900.0


@dataclass
class SimConfig:
    bundle: str
    data: str
    clients: int = 100
    per_step: int = 10
    steps: int = 100
    workers: int = 2  # device processes; each hosts clients / workers virtual clients
    backend: str = "onnxruntime"
    perturbations: int = 1  # seeds per client per task
    batch_size: int = 8
    epsilon: float = 0.01
    optimizer: str = "sgd"
    lr: float = 0.01
    schedule: str = "linear"
    clip_norm: float | None = None
    variance: str = "off"  # off | fixed | threshold | relative (coordinator variance control)
    max_waves: int = 8
    sampler: bool = False
    alpha: float | None = 0.5  # Dirichlet label skew; None: IID
    seed: int = 0
    eval_every: int = 10
    eval_limit: int = 0  # held-out examples evaluated; 0: all
    deadline_s: float = 120.0
    init_theta: str | None = None  # θ file of an earlier run to start from (matching tensors by name)

    def check(self) -> None:
        if not 1 <= self.per_step <= self.clients:
            raise UserError(f"--per-step must lie in 1..--clients ({self.clients}), got {self.per_step}")
        if not 1 <= self.workers <= self.clients:
            raise UserError(f"--workers must lie in 1..--clients ({self.clients}), got {self.workers}")
        for name in ("steps", "perturbations", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        from fwdllm.device_runtime.backend import BACKENDS

        if self.backend not in BACKENDS:
            raise UserError(f"--backend {self.backend!r} is not one of {sorted(BACKENDS)}")
        if self.init_theta and not Path(self.init_theta).is_file():
            raise UserError(f"--init-theta {self.init_theta} does not exist; give an earlier run's theta.safetensors")
        if not Path(self.bundle, "manifest.json").is_file():
            raise UserError(
                f"--bundle {self.bundle} is not a bundle (no manifest.json); create one with `fwdllm export`"
            )

    def coordinator_config(self, heldout: Path) -> dict:
        """The coordinator's settings for this simulation (see coordinator/config.py)."""
        optimizer = {"name": self.optimizer, "lr": self.lr, "schedule": self.schedule}
        if self.clip_norm is not None:
            optimizer["clip_norm"] = self.clip_norm
        return {
            # Exactly per_step tasks per wave, all awaited: results, and so θ, depend on the seeds alone.
            "run": {
                "steps": self.steps,
                "clients_per_step": self.per_step,
                "perturbations_per_client": self.perturbations,
                "over_select": 0.0,
                "min_clients": self.clients,
                "min_results": self.per_step,
                "batch_size": self.batch_size,
                "epsilon": self.epsilon,
                "seed": self.seed,
                "deadline_s": self.deadline_s,
                "init_theta": str(self.init_theta or ""),
            },
            "optimizer": optimizer,
            "variance": {"mode": self.variance, "max_waves": self.max_waves},
            "sampler": {"enabled": self.sampler},
            # Hundreds of idle virtual clients poll: 1 s between pulls keeps that below a tenth of a core.
            "server": {"heartbeat_ms": 3000, "retry_ms": 1000, "rate_per_s": 100.0, "rate_burst": 200},
            "eval": {"every": self.eval_every, "data": str(heldout), "backend": self.backend, "limit": self.eval_limit},
        }


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
                    "fwdllm.simulate",
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
        from tqdm import tqdm

        metrics = self.state / "metrics.jsonl"
        started = time.monotonic()
        bar = tqdm(total=self.cfg.steps, desc="simulate", unit="step", disable=not progress)
        try:
            self._start()
            coordinator = self.procs[0][1]
            while True:
                rows = _steps(_rows(metrics))
                if len(rows) > bar.n:
                    last_eval = next((r for r in reversed(rows) if r.get("accuracy") is not None), {})
                    bar.set_postfix(loss=_fmt(rows[-1].get("loss")), acc=_fmt(last_eval.get("accuracy")), refresh=False)
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
            meta = self._meta()
            meta["wall_s"] = float(meta.get("wall_s", 0.0)) + time.monotonic() - started
            (self.out / SIM_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        return self.finish()

    def finish(self) -> dict:
        """Final θ, plot and report from the coordinator's state."""
        from safetensors.numpy import save_file

        from fwdllm.coordinator.metrics import plot
        from fwdllm.coordinator.state import Store
        from fwdllm.proto.manifest import load_manifest

        all_rows = _rows(self.state / "metrics.jsonl")
        rows = _steps(all_rows)
        if not rows:
            raise UserError(f"the run in {self.out} has applied no step yet; see {self.logs}/coordinator.log")
        initial = next((r for r in all_rows if r["step"] < 0), {})  # the coordinator evaluates θ0 as step -1
        manifest = load_manifest(Path(self.cfg.bundle))
        store = Store(self.state)
        try:
            theta, _ = store.load_checkpoint(len(rows) + 1, manifest.theta)
        finally:
            store.close()
        save_file({k: v.copy() for k, v in manifest.theta.split(theta).items()}, str(self.out / "theta.safetensors"))
        png = plot(
            all_rows,
            self.out / "convergence.png",
            title=f"{self.cfg.data}: {self.cfg.clients} clients, {self.cfg.per_step} per step",
        )
        after = next((r for r in reversed(rows) if r.get("accuracy") is not None or r.get("eval_loss") is not None), {})
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
        (self.out / "report.md").write_text(_report(self.cfg, summary, all_rows))
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        return summary


def _rows(path: Path) -> list[dict]:
    """The coordinator's metrics rows so far; a line still being written is left for the next look."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def _steps(rows: list[dict]) -> list[dict]:
    """The rows of applied steps (the coordinator's step -1 row is the initial evaluation)."""
    return [r for r in rows if r["step"] >= 0]


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _report(cfg: SimConfig, s: dict, rows: list[dict]) -> str:
    b, a = s["before"], s["after"]
    evals = [r for r in rows if r.get("accuracy") is not None]
    lines = [
        f"# fwdllm simulation: {cfg.data}",
        "",
        f"Bundle `{cfg.bundle}`, backend {cfg.backend}; {cfg.clients} clients "
        f"({'IID' if cfg.alpha is None else f'Dirichlet α={cfg.alpha}'}), {cfg.per_step} per step, "
        f"{cfg.perturbations} perturbation(s) per client, batch {cfg.batch_size}; optimizer {cfg.optimizer} lr {cfg.lr} "
        f"({cfg.schedule}); variance control {cfg.variance}, sampler {'on' if cfg.sampler else 'off'}; seed {cfg.seed}.",
        "",
        "| | before | after |",
        "|---|---|---|",
        f"| held-out accuracy | {_fmt(b.get('accuracy'))} | {_fmt(a.get('accuracy'))} |",
        f"| held-out loss | {_fmt(b.get('eval_loss'))} | {_fmt(a.get('eval_loss'))} |",
        "",
        f"{s['steps']} steps, {s['perturbations']:,} perturbations, {s['wall_s']:.0f} s wall time; devices uploaded "
        f"{s['bytes_up']:,} bytes and downloaded {s['bytes_down']:,} bytes in all.",
        "",
        "![convergence](convergence.png)",
        "",
    ]
    if evals:
        lines += ["| step | held-out accuracy | held-out loss |", "|---|---|---|"]
        lines += [f"| {r['step'] + 1} | {_fmt(r.get('accuracy'))} | {_fmt(r.get('eval_loss'))} |" for r in evals]
    return "\n".join(lines) + "\n"


def simulate(cfg: SimConfig | None, out: Path, resume: bool = False, progress: bool = True, options=None) -> dict:
    """Start (or with ``resume`` continue) a simulation in ``out``; returns its summary."""
    sim = Simulation.resume(out) if resume else Simulation.create(cfg, out, options)
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


# ---------------------------------------------------------------- a device worker process


class _Serialized:
    """A backend shared by the virtual clients of one worker: one computation at a time."""

    def __init__(self, backend):
        self._backend, self._lock = backend, threading.Lock()

    def losses(self, batch, thetas):
        with self._lock:
            return self._backend.losses(batch, thetas)

    def logits(self, batch, theta):
        with self._lock:
            return self._backend.logits(batch, theta)

    def __getattr__(self, name):
        return getattr(self._backend, name)


def worker_main(argv: list[str] | None = None) -> int:
    """Host virtual clients ``first .. first+count-1`` of a partition; join them in order, then serve."""
    p = argparse.ArgumentParser(prog="python -m fwdllm.simulate", description=worker_main.__doc__)
    p.add_argument("--coordinator", required=True)
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--partition", required=True, type=Path)
    p.add_argument("--first", required=True, type=int)
    p.add_argument("--count", required=True, type=int)
    p.add_argument("--token", required=True)
    p.add_argument("--devices", required=True, type=Path, help="folder for the clients' state files")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--ready", required=True, type=Path, help="file created once every client has joined")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from fwdllm.data.partition import client_file
    from fwdllm.device_runtime.backend import open_backend
    from fwdllm.device_runtime.client import ClientConfig, DeviceClient
    from fwdllm.proto.manifest import load_manifest

    manifest = load_manifest(args.bundle)
    shared = _Serialized(open_backend(args.bundle, args.backend, options={"threads": 1}, manifest=manifest))
    clients = []
    for i in range(args.first, args.first + args.count):
        cfg = ClientConfig(
            coordinator=args.coordinator,
            bundle=args.bundle,
            data=args.partition / client_file(i),
            backend=args.backend,
            token=args.token,
            name=f"sim-{i:05d}",
            state_file=args.devices / f"client-{i:05d}.json",
        )
        client = DeviceClient(cfg, backend=shared)
        client.join()
        clients.append(client)
    stop = threading.Event()

    def on_signal(*_):  # a pause for --resume, not a departure: the devices keep their tasks
        stop.set()
        for c in clients:
            c.stop(leave=False)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    codes: list[int] = []
    threads = [
        threading.Thread(target=lambda c=c: codes.append(c.run()), name=c.cfg.name, daemon=True) for c in clients
    ]
    for t in threads:
        t.start()
    args.ready.touch()
    for t in threads:
        while t.is_alive():
            t.join(0.5)
    return 0 if stop.is_set() or (len(codes) == len(clients) and all(code == 0 for code in codes)) else 1


if __name__ == "__main__":
    sys.exit(worker_main())
