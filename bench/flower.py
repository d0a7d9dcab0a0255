"""fwdllm on Flower: wall time per step and peak memory against `fwdllm simulate`, and bytes against FedAvg.

    python bench/flower.py            # 100 and 1,000 virtual clients, both engines; message sizes
    python bench/flower.py --quick    # 20 clients

Each run is `fwdllm simulate` of the same job (MiniLM head with prefix reuse on BBC News, 10 clients per
step, 20 perturbations each) with ``--engine processes`` (a coordinator and 2 worker processes over
loopback gRPC) or ``--engine flower`` (Flower's Simulation Engine on a local Ray instance, one virtual
node per client, 1 CPU each), in a child process that samples the resident memory of itself and all its
descendants (Ray's daemons and actors, the coordinator and workers) every 0.2 s. The time per step is the
coordinator's own ``step_time_s`` (from a wave's opening to the step's commit), the median over the steps.

Bytes per client per step are the payloads Flower serializes (its records, without message metadata):
fwdllm's task (its seeds) and reply (one scalar per perturbation and the losses), plus the update history
a node one version behind receives; against a Flower FedAvg round of the same LoRA parameters, which sends
them down and back up in an ArrayRecord.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.harness import bundle  # noqa: E402
from bench.report import write_results  # noqa: E402

PER_STEP, PERTURBATIONS = 10, 20


def one_run(engine: str, clients: int, steps: int, out: Path) -> dict:
    """The job in this process with ``engine``; its wall time, step times and peak memory of the process tree."""
    import psutil

    from fwdllm.simulate import SimConfig, simulate

    peak, done = [0], threading.Event()

    def sample() -> None:
        me = psutil.Process()
        while not done.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            peak[0] = max(peak[0], total)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cfg = SimConfig(
        bundle=str(bundle("head", "head")),
        data="bbc",
        clients=clients,
        per_step=PER_STEP,
        steps=steps,
        perturbations=PERTURBATIONS,
        lr=0.5,
        eval_every=steps,
        eval_limit=200,
        engine=engine,
    )
    started = time.perf_counter()
    summary = simulate(cfg, out, progress=False)
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    rows = [json.loads(line) for line in (out / "state" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["step"] >= 0]
    return {
        "wall_s": wall,
        "step_s": statistics.median(r["step_time_s"] for r in rows),
        "peak_rss_mib": peak[0] / 2**20,
        "accuracy": summary["after"].get("accuracy"),
        "bytes_per_client_step": (summary["bytes_up"] + summary["bytes_down"]) / (steps * PER_STEP),
    }


def measure(engine: str, clients: int, steps: int, timeout_s: int) -> dict | None:
    """``one_run`` in a child process; None when it does not finish within ``timeout_s`` (it is stopped as by
    Ctrl-C, which stops the run's own processes too)."""
    import signal

    cmd = [sys.executable, __file__, "--one", engine, str(clients), str(steps)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        return None
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} with {clients} clients failed: {err.strip()[-800:]}")
    return json.loads(out.strip().splitlines()[-1])


def payload_bytes(records) -> int:
    """What Flower serializes for a RecordDict: every object in its tree, deflated."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(records).values())


def message_sizes(lora: Path) -> list[dict]:
    """fwdllm's Flower messages for one task against FedAvg's of the same LoRA parameters."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    from fwdllm.device_runtime.work import Task, TaskResult
    from fwdllm.flower.records import HISTORY, TASK, history_record, reply_content, task_records
    from fwdllm.proto.manifest import load_manifest
    from fwdllm.proto.perturbation import seed_for
    from fwdllm.proto.v1 import fwdllm_pb2 as pb

    manifest = load_manifest(lora)
    dim = manifest.theta.dim
    seeds = [seed_for(3, i) for i in range(PERTURBATIONS)]
    job = {"bundle": str(lora), "partition": "/runs/flower/data", "backend": "onnxruntime"}
    task = task_records(Task(seeds, 24, 8), "t3-0-0123456789ab", 3, 4, manifest.fingerprint(), 3, job)
    down = payload_bytes(RecordDict({TASK: task}))
    jvp = np.random.default_rng(1).standard_normal(PERTURBATIONS).astype(np.float32)
    result = TaskResult(seeds, jvp, [], 1.6, 1.5, 1.7, float("nan"), 2 * PERTURBATIONS, 1, 0.1, 8, 0.1)
    up = payload_bytes(reply_content(result, 4, "t3-0-0123456789ab"))
    row = pb.UpdateRecord(version=4, lr=0.5, seeds=seeds * PER_STEP, coefficients=[0.1] * PERTURBATIONS * PER_STEP)
    behind = payload_bytes(
        RecordDict({TASK: task, HISTORY: history_record(pb.FetchHistoryResponse(available=True, updates=[row]))})
    )
    rng = np.random.default_rng(0)  # not zeros: Flower stores identical chunks once
    params = {t.name: Array(rng.standard_normal(t.shape).astype(np.float32)) for t in manifest.theta.tensors}
    fedavg_down = payload_bytes(RecordDict({"arrays": ArrayRecord(params), "config": ConfigRecord({"lr": 0.01})}))
    fedavg_up = payload_bytes(
        RecordDict({"arrays": ArrayRecord(params), "metrics": MetricRecord({"num-examples": 8, "train_loss": 1.6})})
    )
    return [
        {"what": f"fwdllm, node holding θ ({PERTURBATIONS} seeds down, scalars up)", "down": down, "up": up},
        {
            "what": f"fwdllm, node one version behind (+ history of {PER_STEP * PERTURBATIONS} seeds)",
            "down": behind,
            "up": up,
        },
        {"what": f"FedAvg of the same {dim:,} LoRA values", "down": fedavg_down, "up": fedavg_up},
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--timeout-s", type=int, default=900, help="give up on a run after this long (default 900)")
    p.add_argument("--one", nargs=3, metavar=("ENGINE", "CLIENTS", "STEPS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        engine, clients, steps = args.one[0], int(args.one[1]), int(args.one[2])
        with tempfile.TemporaryDirectory(prefix="fwdllm-bench-flower-") as tmp:
            print(json.dumps(one_run(engine, clients, steps, Path(tmp) / "run")))
        return 0

    sizes, steps = ((20,), 2) if args.quick else ((100, 1000), 4)
    rows = []
    for clients in sizes:
        for engine in ("processes", "flower"):
            name = "fwdllm simulate" if engine == "processes" else "Flower (Ray)"
            got = measure(engine, clients, steps, args.timeout_s)
            if got is None:
                rows.append(
                    {"clients": clients, "engine": name, "s per step (median)": f"not finished in {args.timeout_s} s"}
                )
                continue
            rows.append(
                {
                    "clients": clients,
                    "engine": name,
                    "s per step (median)": round(got["step_s"], 2),
                    "wall s (whole run)": round(got["wall_s"], 1),
                    "peak RSS MiB (all processes)": round(got["peak_rss_mib"]),
                    "bytes per client per step": round(got["bytes_per_client_step"]),
                    "final acc": got["accuracy"],
                }
            )
    sizes_rows = message_sizes(bundle("lora", "top:2"))
    columns = [
        "clients",
        "engine",
        "s per step (median)",
        "wall s (whole run)",
        "peak RSS MiB (all processes)",
        "bytes per client per step",
        "final acc",
    ]
    table = "\n".join(
        [
            "| Flower payload per client per step (MiniLM LoRA top 2) | down bytes | up bytes |",
            "|---|---|---|",
            *(f"| {r['what']} | {r['down']:,} | {r['up']:,} |" for r in sizes_rows),
        ]
    )
    notes = (
        f"The same job through both engines: MiniLM-L6 head with prefix reuse, BBC News, {PER_STEP} clients per step, "
        f"{PERTURBATIONS} perturbations each, {steps} steps, evaluation after the last (200 held-out articles). "
        "s per step is the coordinator's step_time_s; the wall time includes start-up (Ray, partitioning, joins). "
        "Peak RSS sums every process of the run. bytes per client per step are the run's own counts (the gRPC "
        "messages, which fwdllm on Flower counts alike).\n\n" + table
    )
    command = "python bench/flower.py" + (" --quick" if args.quick else "") + f" --timeout-s {args.timeout_s}"
    write_results("flower", command, rows, columns, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
