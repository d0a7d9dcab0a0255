"""An in-process federated run: the real coordinator and N virtual devices in one process, no sockets.

`fwdllm simulate` measures the system (processes, gRPC, waits); studies need many short runs and
exact accounting, so this simulator calls the same objects directly, as Flower's simulation does.
The coordinator (rounds, waves, variance control, sampler, optimiser, SQLite state in a temp folder)
runs unchanged; each virtual device computes its task with the device's own ``do_task`` on one shared
backend, on its own partition file. Devices are served in a fixed order, so a run depends on its
seeds alone, and θ equals `fwdllm simulate`'s for the same settings up to float rounding (its devices
replay the update history where these download θ).

Per step it records the coordinator's metrics row (loss, perturbations, waves, lr, grad norm, held-out
accuracy/loss on evaluation steps) plus the devices' compute seconds; bytes_up / bytes_down are the
coordinator's own counts (Submit messages; tasks and θ downloads).
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fwdllm.data.datasets import LoadOptions, seeded_split
from fwdllm.device_runtime.work import LocalData, TaskResult, do_task
from fwdllm.sim_config import SimConfig
from fwdllm.simulate_link import LocalCoordinator


@dataclass
class InProcessResult:
    rows: list[dict]  # one per step: the coordinator's metrics row (bytes_up/down, loss, lr ...) + device_seconds
    before: dict  # held-out metrics of the initial θ
    final: dict  # held-out metrics of the θ the run ended on (after any early-stopping restore)
    theta: np.ndarray
    wall_s: float
    config: dict = field(default_factory=dict)
    submissions: list[tuple[int, list[int], np.ndarray]] = field(default_factory=list)  # (step, seeds, jvp) if kept

    def evals(self) -> list[dict]:
        return [r for r in self.rows if r.get("test_accuracy") is not None]

    def save_theta(self, path: Path) -> Path:
        """The final θ as named tensors: what ``SimConfig.init_theta`` of a later run starts from."""
        from fwdllm.proto.manifest import load_manifest, save_theta

        path.parent.mkdir(parents=True, exist_ok=True)
        save_theta(path, load_manifest(Path(self.config["sim"]["bundle"])).theta, self.theta)
        return path


def merge(base: dict, extra: dict) -> dict:
    """``base`` with ``extra`` laid over it, nested dicts merged key by key."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


class HeldoutEvaluator:
    """The coordinator's evaluation hook: a validation split (for early stopping) and the test set.

    ``eval_loss``/``accuracy`` come from the validation examples when the run carves some out
    of the clients' training data, else from the test set; ``test_*`` always from the test set.
    """

    def __init__(self, test, validation=None):
        self.test, self.validation = test, validation

    def __call__(self, theta: np.ndarray) -> dict:
        test = self.test(theta)
        out = {"test_accuracy": test.get("accuracy"), "test_loss": test["eval_loss"]}
        out.update(self.validation(theta) if self.validation else test)
        return out


def run(
    sim: SimConfig,
    overrides: dict | None = None,
    *,
    validation_fraction: float = 0.0,
    load_options: LoadOptions | None = None,
    workdir: Path | None = None,
    progress: bool = True,
    desc: str = "in-process",
    keep_submissions: bool = False,
    tamper: Callable[[int, TaskResult], TaskResult] | None = None,
) -> InProcessResult:
    """One federated run of ``sim`` (clients, per_step, steps, optimiser ...) in this process.

    ``overrides`` is merged into the coordinator config that ``sim`` gives (e.g.
    ``{"optimizer": {"normalize": True}, "eval": {"patience": 5}}``). ``validation_fraction``
    carves that share of every client's examples out as the validation set the coordinator
    evaluates (and early-stops on); the test set then only reports. ``keep_submissions`` keeps
    every accepted (step, seeds, jvp) so a test can recompute the updates independently. ``tamper(i, result)``
    says what device ``i`` submits in place of its honest result: studies of hostile clients.
    """
    sim.check()
    owned: tempfile.TemporaryDirectory[str] | None = None
    if workdir is None:
        owned = tempfile.TemporaryDirectory(prefix="fwdllm-inprocess-")
        root = Path(owned.name)
    else:
        root = Path(workdir)
    try:
        return _run(
            sim, overrides or {}, validation_fraction, load_options, root, progress, desc, keep_submissions, tamper
        )
    finally:
        if owned:
            owned.cleanup()


def _run(sim, overrides, validation_fraction, load_options, root, progress, desc, keep, tamper) -> InProcessResult:
    from fwdllm.coordinator.evaluation import BackendEvaluator
    from fwdllm.data.partition import client_file, open_federated, write_partition
    from fwdllm.device_runtime.backend import open_backend
    from fwdllm.device_runtime.examples import load_examples
    from fwdllm.proto.manifest import load_manifest

    bundle = Path(sim.bundle)
    manifest = load_manifest(bundle)
    fed = open_federated(sim.data, sim.clients, alpha=sim.alpha, seed=sim.seed, options=load_options)
    validation = []
    if validation_fraction > 0:
        for i, examples in enumerate(fed.clients):
            keep_examples, held = seeded_split(examples, validation_fraction, sim.seed + i, key=None)
            fed.clients[i] = keep_examples
            validation += held
    data = root / "data"
    write_partition(fed, data)
    backend = open_backend(bundle, sim.backend, options={"threads": 1}, manifest=manifest)
    test_eval = BackendEvaluator(bundle, data / "heldout.jsonl", sim.backend, limit=sim.eval_limit)
    val_eval = None
    if validation:
        (data / "validation.jsonl").write_text("".join(json.dumps(e) + "\n" for e in validation))
        val_eval = BackendEvaluator(bundle, data / "validation.jsonl", sim.backend)
    evaluator = HeldoutEvaluator(test_eval, val_eval)
    config = merge(
        sim.coordinator_config(data / "heldout.jsonl"),
        {
            # devices are served one after another here, without heartbeats, so a wave's wall time says nothing
            "server": {"rate_per_s": 1e9, "rate_burst": 1 << 30, "active_window_s": 1e9, "silent_after_beats": 0},
            "run": {"deadline_s": 1e7},
        },
    )
    coordinator = LocalCoordinator(bundle, root / "state", merge(config, overrides), evaluator)
    tokenizer = backend.tokenizer()
    devices = [
        coordinator.join(
            f"virtual-{i:05d}", LocalData(load_examples(data / client_file(i), manifest), tokenizer), backend
        )
        for i in range(sim.clients)
    ]
    spent: dict[int, float] = {}  # step -> device compute seconds
    submissions = []
    started = time.perf_counter()
    bar = tqdm(total=sim.steps, desc=desc, unit="step", disable=not progress, leave=False)
    while not coordinator.finished:
        served = 0
        for index, device in enumerate(devices):
            task = coordinator.pull(device)
            if task is None:
                continue
            result = do_task(task.work, backend, device.data, coordinator.theta_for(device, task.theta_version))
            spent[task.step] = spent.get(task.step, 0.0) + result.device_seconds
            if tamper is not None:
                result = tamper(index, result)
            coordinator.submit(device, task, result)
            if keep:
                submissions.append((task.step, result.seeds, result.jvp.copy()))
            served += 1
            bar.update(max(0, coordinator.step - bar.n))
        if not served and not coordinator.finished:
            raise RuntimeError(
                f"no device got a task at step {coordinator.step}: the coordinator config "
                "lets no wave open (min_clients / active window)"
            )
    bar.close()
    wall = time.perf_counter() - started
    rows = coordinator.metrics_rows()
    before = rows.pop(0) if rows and rows[0]["step"] == -1 else {}
    for row in rows:
        row["device_seconds"] = spent.get(row["step"], 0.0)
    theta = coordinator.theta()
    final = evaluator(theta)
    used = coordinator.config_json()
    coordinator.close()
    backend.close()
    return InProcessResult(rows, before, final, theta, wall, {"sim": asdict(sim), "coordinator": used}, submissions)
