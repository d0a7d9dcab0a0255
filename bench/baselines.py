"""Backprop federated baselines (FedAvg of PEFT parameters, PyTorch) on AG News: accuracy against
steps, device compute seconds and bytes uploaded, and peak memory: the anchors fwdllm is compared with.

Each PEFT runs `fwdllm baseline` in a fresh process, so its peak RSS is its own.

    python bench/baselines.py                 # head, bitfit, lora, adapter, fedadapter, full; 60 rounds of 10 clients
    python bench/baselines.py --quick         # bitfit, 4 rounds: checks the script still runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.harness import AG_NEWS  # noqa: E402
from bench.report import RESULTS_DIR, write_results  # noqa: E402

TARGETS = (0.80, 0.875)  # 0.875: FwdLLM's AG News target
RUNS = RESULTS_DIR / "baselines"  # one folder per PEFT: config.json + metrics.jsonl (time_to_accuracy.py reuses them)
STEPS = 60


def run_one(peft: str, args, out: Path) -> list[dict]:
    cmd = [
        sys.executable,
        "-m",
        "fwdllm.cli",
        "baseline",
        "--data",
        args.data,
        "--peft",
        peft,
        "--clients",
        str(args.clients),
        "--per-step",
        str(args.per_step),
        "--steps",
        str(args.steps),
        "--eval-every",
        str(args.eval_every),
        "--eval-limit",
        str(args.eval_limit),
        "--seed",
        str(args.seed),
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def row_for(peft: str, records: list[dict], config: dict) -> dict:
    last = records[-1]
    row = {
        "peft": peft,
        "trainable": config["num_trainable"],
        "steps": last["step"],
        "final acc": last["heldout_accuracy"],
        "final loss": last["heldout_loss"],
        "device s": last["device_seconds"],
        "MiB up": last["bytes_up"] / 2**20,
        "peak RSS MiB": last["peak_rss_mib"],
    }
    for target in TARGETS:
        hit = next((r for r in records if r["heldout_accuracy"] >= target), None)
        row[f"steps to {target}"] = hit["step"] if hit else "not reached"
        row[f"device s to {target}"] = hit["device_seconds"] if hit else "-"
        row[f"MiB up to {target}"] = hit["bytes_up"] / 2**20 if hit else "-"
    return row


def figure(curves: dict[str, list[dict]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), sharey=True)
    for peft, records in curves.items():
        acc = [r["heldout_accuracy"] for r in records]
        for ax, key, scale in zip(axes, ("step", "device_seconds", "bytes_up"), (1, 1, 2**-20)):
            ax.plot([r[key] * scale for r in records], acc, marker=".", label=peft)
    for ax, label in zip(axes, ("rounds", "device compute seconds (all clients)", "MiB uploaded (all clients)")):
        ax.set_xlabel(label)
        ax.axhline(TARGETS[-1], color="grey", linestyle=":", linewidth=1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out accuracy")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--data", default=f"agnews:{AG_NEWS}")
    p.add_argument("--pefts", default="head,bitfit,lora,adapter,fedadapter,full")
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--per-step", type=int, default=10)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument(
        "--eval-limit", type=int, default=500, help="held-out examples per evaluation (AG News split: 1,520)"
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.pefts, args.clients, args.per_step, args.steps, args.eval_every, args.eval_limit = (
            "bitfit",
            20,
            2,
            4,
            2,
            64,
        )
    curves, rows = {}, []
    for peft in args.pefts.split(","):
        out = RUNS / peft
        curves[peft] = run_one(peft, args, out)
        rows.append(row_for(peft, curves[peft], json.loads((out / "config.json").read_text())))
    png = figure(curves, ROOT / "bench" / "figures" / ("baselines-quick.png" if args.quick else "baselines.png"))
    columns = list(rows[0])
    notes = (
        f"MiniLM-L6 (mean pooling, new linear head), {args.data.split(':')[0]}, {args.clients} Dirichlet(0.5) clients, "
        f"{args.per_step} per round, batch 8, sequence 64, one local SGD step and server Adam per round (FedSGD). "
        f"Accuracy on {args.eval_limit} held-out examples every {args.eval_every} rounds, so 'steps to' is rounded up "
        "to that grid. Device seconds: wall time of the clients' forward+backward, summed; MiB up: trainable "
        f"parameters x 4 bytes per client per round. Peak RSS: the whole process (all clients, one at a time). "
        "fedadapter is FedAdapter (Cai et al. 2022) with a fixed schedule, not the paper's trial groups of clients: "
        "adapters on the top 2, 4, then 6 layers, 8, 16, then 32 wide, in three equal stages of the rounds (server "
        "Adam restarts at each upgrade); its 'trainable' is the first stage's, its MiB up counts each stage's own. "
        f"Figure: `{png.relative_to(ROOT)}`."
    )
    command = "python bench/baselines.py" + (" --quick" if args.quick else "")
    write_results("baselines", command, rows, columns, notes)
    print((RESULTS_DIR / "baselines.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
