"""An in-process federated run: the real ``Coordinator`` and N virtual devices, no sockets.

`fwdllm simulate` measures the system (processes, gRPC, waits); the studies in bench/ need
many short runs and exact accounting, so this harness calls the same objects directly. The
coordinator (rounds, waves, variance control, sampler, optimiser, SQLite state in a temp
folder) gets protobuf Join / PullTask / Submit / FetchParameters messages exactly as its
gRPC servicer would hand them over; each virtual device computes its task with the real
engine (``forward_gradients``) on one shared backend, on its own partition file. Clients are
served in a fixed order, so a run depends on its seeds alone.

Per step it records the coordinator's metrics row (loss, perturbations, waves, lr, grad
norm, held-out accuracy/loss on evaluation steps) plus the devices' compute seconds;
its bytes_up / bytes_down are the coordinator's own counts (Submit messages; tasks and θ
downloads through FetchParameters).
"""

from __future__ import annotations

import copy
import fcntl
import json
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fwdllm.data.datasets import LoadOptions, seeded_split
from fwdllm.simulate import SimConfig

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "bench-bundles"
THETAS = CACHE.parent / "bench-theta"  # final θ of runs that later runs start from (SimConfig.init_theta)
BBC_LABELS = ["business", "entertainment", "politics", "sports", "tech"]
# The AG News test split in shared/ (beside the checkout, where CI lays its copy, or the workplace's): benchmarks and
# tests may read it, the product never needs it.
AG_NEWS = next(
    (
        p
        for p in (
            Path(__file__).resolve().parents[2] / "shared/data/ag_news/test.csv",
            Path("/work/shared/data/ag_news/test.csv"),
        )
        if p.is_file()
    ),
    Path("/work/shared/data/ag_news/test.csv"),
)


def bundle(
    peft: str,
    layers: str = "all",
    seq_len: int = 64,
    labels: list[str] = BBC_LABELS,
    model: str = "minilm",
    formats: str = "onnx",
    precision: str = "fp32",
    task: str = "seq-cls",
    label_words: bool = False,
) -> Path:
    """A bundle made by `fwdllm export`, cached under .cache/ (exports take minutes).

    ``label_words``: a causal-lm bundle that answers with ``labels`` as words (else open-ended).

    The export runs in a child process so this one never loads torch: a process's ru_maxrss
    starts at its parent's resident size (fork copies the high-water mark), which would
    inflate every memory measurement spawned from here.
    """
    words = "-words" if task == "causal-lm" and label_words else ""
    name = f"{model}-{task}{words}-{peft}-{layers.replace(':', '')}-s{seq_len}-{len(labels)}-{formats}-{precision}"
    out = CACHE / name.replace(",", "_")
    CACHE.mkdir(parents=True, exist_ok=True)
    # make bench runs sections side by side: the first to ask for a bundle exports it, the others wait for it
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "manifest.json").is_file():
            args = [
                "export",
                "--model",
                model,
                "--task",
                task,
                "--peft",
                peft,
                "--trainable-layers",
                layers,
                "--format",
                formats,
                "--precision",
                precision,
                "--seq-len",
                str(seq_len),
                "--out",
                str(out),
            ]
            if task == "seq-cls" or words:
                args += ["--label-names", ",".join(labels)]
            proc = subprocess.run([sys.executable, "-m", "fwdllm.cli", *args], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"fwdllm {' '.join(args)} failed: {proc.stderr.strip()[-500:]}")
    return out


@dataclass
class HarnessResult:
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


def theta_file(run_name: str) -> Path:
    """Where the final θ of the run called ``run_name`` is kept (``HarnessResult.save_theta``)."""
    return THETAS / ("".join(c if c.isalnum() else "-" for c in run_name) + ".safetensors")


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


class _HeldoutEvaluator:
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
    desc: str = "harness",
    keep_submissions: bool = False,
) -> HarnessResult:
    """One federated run of ``sim`` (clients, per_step, steps, optimiser ...) in this process.

    ``overrides`` is merged into the coordinator config that ``sim`` gives (e.g.
    ``{"optimizer": {"normalize": True}, "eval": {"patience": 5}}``). ``validation_fraction``
    carves that share of every client's examples out as the validation set the coordinator
    evaluates (and early-stops on); the test set then only reports. ``keep_submissions`` keeps
    every accepted (step, seeds, jvp) so a test can recompute the updates independently.
    """
    from fwdllm.coordinator.config import from_dict
    from fwdllm.coordinator.evaluation import BackendEvaluator
    from fwdllm.coordinator.rounds import Coordinator
    from fwdllm.data.partition import client_file, open_federated, write_partition
    from fwdllm.device_runtime.backend import load_examples, open_backend, select
    from fwdllm.device_runtime.client import DIST, SCHEME, capabilities
    from fwdllm.device_runtime.engine import forward_gradients
    from fwdllm.proto.manifest import load_manifest
    from fwdllm.proto.v1 import fwdllm_pb2 as pb

    sim.check()
    owned = tempfile.TemporaryDirectory(prefix="fwdllm-harness-") if workdir is None else None
    root = Path(owned.name if owned else workdir)
    try:
        bundle = Path(sim.bundle)
        manifest = load_manifest(bundle)
        fed = open_federated(sim.data, sim.clients, alpha=sim.alpha, seed=sim.seed, options=load_options)
        validation = []
        if validation_fraction > 0:
            for i, examples in enumerate(fed.clients):
                keep, held = seeded_split(examples, validation_fraction, sim.seed + i, key=None)
                fed.clients[i] = keep
                validation += held
        data = root / "data"
        write_partition(fed, data)
        backend = open_backend(bundle, sim.backend, options={"threads": 1}, manifest=manifest)
        test_eval = BackendEvaluator(bundle, data / "heldout.jsonl", sim.backend, limit=sim.eval_limit)
        val_eval = None
        if validation:
            (data / "validation.jsonl").write_text("".join(json.dumps(e) + "\n" for e in validation))
            val_eval = BackendEvaluator(bundle, data / "validation.jsonl", sim.backend)
        evaluator = _HeldoutEvaluator(test_eval, val_eval)
        coord_cfg = _merge(
            sim.coordinator_config(data / "heldout.jsonl"),
            {
                "server": {"rate_per_s": 1e9, "rate_burst": 1 << 30, "active_window_s": 1e9},
                # devices are served one after another here, so a wave's wall time says nothing
                "run": {"deadline_s": 1e7},
            },
        )
        cfg = from_dict(_merge(coord_cfg, overrides or {}))
        coordinator = Coordinator(bundle, root / "state", cfg, evaluator=evaluator)  # evaluates θ0 as step -1
        token = secrets.token_urlsafe(16)
        coordinator.store.add_token(token, "harness")
        caps = capabilities(backend)
        tokenizer = backend.tokenizer()
        devices = []
        for i in range(sim.clients):
            examples = load_examples(data / client_file(i), manifest)
            resp = coordinator.join(
                pb.JoinRequest(
                    protocol_version=pb.PROTOCOL_VERSION_1,
                    enrolment_token=token,
                    client_name=f"virtual-{i:05d}",
                    capabilities=caps,
                    model_fingerprint=coordinator.fingerprint,
                    num_examples=len(examples),
                )
            )
            devices.append(
                {"id": resp.client_id, "session": resp.session_token, "examples": examples, "version": 0, "theta": None}
            )
        spent: dict[int, float] = {}  # step -> device compute seconds
        submissions = []
        started = time.perf_counter()
        bar = tqdm(total=sim.steps, desc=desc, unit="step", disable=not progress, leave=False)
        while not coordinator.store.get("finished"):
            served = 0
            for dev in devices:
                resp = coordinator.pull_task(
                    pb.PullTaskRequest(client_id=dev["id"], session_token=dev["session"], theta_version=dev["version"])
                )
                if resp.WhichOneof("outcome") != "task":
                    continue
                task = resp.task
                if dev["version"] != task.theta_version:  # the device downloads θ (counted in bytes_down)
                    chunks = list(
                        coordinator.fetch_parameters(
                            pb.FetchParametersRequest(
                                client_id=dev["id"], session_token=dev["session"], version=task.theta_version
                            )
                        )
                    )
                    dev["theta"] = np.frombuffer(b"".join(c.values for c in chunks), dtype="<f4").copy()
                    dev["version"] = task.theta_version
                seeds = [int(s) for s in task.seeds] + [
                    int(r.start) + j for r in task.seed_ranges for j in range(r.count)
                ]
                batch = tokenizer.batch(select(dev["examples"], task.batch.start, task.batch.size))
                result = forward_gradients(
                    backend,
                    batch,
                    dev["theta"],
                    seeds,
                    epsilon=task.epsilon,
                    scheme=SCHEME[task.scheme],
                    distribution=DIST[task.distribution],
                )
                request = pb.SubmitRequest(
                    client_id=dev["id"],
                    session_token=dev["session"],
                    task_id=task.task_id,
                    step=task.step,
                    seeds=seeds,
                    jvp=result.jvp.tolist(),
                    nonfinite=result.nonfinite,
                    loss=pb.LossStats(
                        mean=result.loss_mean, min=result.loss_min, max=result.loss_max, base=result.loss_base
                    ),
                    num_examples=task.batch.size,
                    compute_time_ms=int(result.seconds * 1000),
                )
                spent[task.step] = spent.get(task.step, 0.0) + result.seconds
                coordinator.submit(request, request.ByteSize())
                if keep_submissions:
                    submissions.append((task.step, seeds, result.jvp.copy()))
                served += 1
                if coordinator.step > bar.n:
                    bar.update(coordinator.step - bar.n)
            if not served and not coordinator.store.get("finished"):
                raise RuntimeError(
                    f"no device got a task at step {coordinator.step}: the coordinator config "
                    "lets no wave open (min_clients / active window)"
                )
        bar.close()
        wall = time.perf_counter() - started
        rows = [json.loads(r[0]) for r in coordinator.store.query("SELECT row FROM metrics ORDER BY step")]
        before = rows.pop(0) if rows and rows[0]["step"] == -1 else {}
        for row in rows:
            row["device_seconds"] = spent.get(row["step"], 0.0)
        theta = coordinator.theta.copy()
        final = evaluator(theta)
        coordinator.close()
        backend.close()
        return HarnessResult(
            rows, before, final, theta, wall, {"sim": asdict(sim), "coordinator": cfg.to_json()}, submissions
        )
    finally:
        if owned:
            owned.cleanup()
