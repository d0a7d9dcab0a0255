"""Steps to target accuracy with 1, 10, 50 and 200 clients per step.

    python bench/scaling.py            # AG News, MiniLM head-only with prefix reuse, 200 clients
    python bench/scaling.py --quick    # a few steps with 1 and 10 clients per step

The paper's client-number figure: every client adds its perturbations to the step's
estimate, so more clients per step means a less noisy gradient and fewer steps, at more
device work per step. Same recipe for every row, per-client perturbations fixed, and the
estimate normalised to a fixed step length, so only the client count (the direction's quality)
changes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.report import write_results  # noqa: E402
from bench.time_to_accuracy import AGNEWS, FIGURES, curve_fwdllm, first_reaching  # noqa: E402

TARGETS = (0.70, 0.80)
PER_CLIENT = 10
LR = 2.0  # step length: the estimate is normalised, so only its direction improves with more clients


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    from fwdllm.data.corpora import AGNEWS_LABELS

    per_steps = (1, 10) if args.quick else (1, 10, 50, 200)
    clients, steps, every, limit = (20, 3, 1, 64) if args.quick else (200, 12, 1, 300)
    curves, rows = {}, []
    for k in per_steps:
        common = {"clients": clients, "per_step": k, "alpha": 0.5, "seed": 0, "eval_every": every, "eval_limit": limit}
        variant = (("head", "head"), {"perturbations": PER_CLIENT, "lr": LR}, {"optimizer": {"normalize": True}})
        pts, _ = curve_fwdllm(f"{k} per step", variant, AGNEWS, AGNEWS_LABELS, steps, common)
        curves[k] = pts
        row = {"clients per step": k, "perturbations per step": k * PER_CLIENT, "final acc": pts[-1]["accuracy"]}
        for t in TARGETS:
            hit = first_reaching(pts, t)
            row[f"steps to ≥{t:g}"] = "not reached" if hit is None else hit["step"]
            row[f"device s to ≥{t:g}"] = "" if hit is None else hit["device_seconds"]
        rows.append(row)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for k, pts in curves.items():
        ax.plot([q["step"] for q in pts], [q["accuracy"] for q in pts], marker=".", label=f"{k} clients/step")
    ax.set_xlabel("steps")
    ax.set_ylabel("held-out accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("AG News, MiniLM head-only: clients per step")
    fig.tight_layout()
    figure = FIGURES / ("scaling-quick.png" if args.quick else "scaling.png")
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=110)
    plt.close(fig)
    columns = [
        "clients per step",
        "perturbations per step",
        *(f"steps to ≥{t:g}" for t in TARGETS),
        *(f"device s to ≥{t:g}" for t in TARGETS),
        "final acc",
    ]
    notes = (
        f"AG News, MiniLM-L6 head-only with prefix reuse, {clients} non-IID clients (α=0.5), {PER_CLIENT} "
        f"perturbations per client, SGD on the normalised estimate (step length {LR}, linear decay over {steps} "
        f"steps); accuracy on the first {limit} held-out articles every {every} steps. The paper reports fewer steps "
        "to target as clients per step grow; compare the rows (the estimate's noise falls as 1/perturbations per "
        f"step).\n\n![scaling]({figure.relative_to(ROOT)})"
    )
    write_results("scaling", "python bench/scaling.py" + (" --quick" if args.quick else ""), rows, columns, notes)
    print((ROOT / "bench" / "results" / "scaling.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
