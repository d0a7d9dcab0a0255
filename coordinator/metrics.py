"""Per-step metrics as JSONL and CSV beside the state, and `fwdllm plot` to draw one run or several.

SQLite holds the authoritative rows; the two files are rewritten from it at start-up, so a
crash between a commit and an append never leaves them behind the database.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from fwdllm.errors import UserError

COLUMNS = [
    "step",
    "theta_version",
    "time",
    "loss",
    "eval_loss",
    "accuracy",
    "perturbations",
    "waves",
    "variance",
    "lr",
    "grad_norm",
    "grad_scale",
    "bytes_up",
    "bytes_down",
    "step_time_s",
    "clients_answered",
    "clients_failed",
    "dropped_nonfinite",
    "clipped",
]


class MetricsLog:
    def __init__(self, state_dir: Path):
        self.jsonl = Path(state_dir) / "metrics.jsonl"
        self.csv = Path(state_dir) / "metrics.csv"

    def rewrite(self, rows: list[dict]) -> None:
        with open(self.jsonl, "w") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
        with open(self.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def append(self, row: dict) -> None:
        with open(self.jsonl, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        new = not self.csv.exists()
        with open(self.csv, "a", newline="") as fh:
            writer = csv.DictWriter(fh, COLUMNS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"metrics file {path} does not exist; it is metrics.jsonl in the coordinator's --state folder")
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise UserError(f"{path} line {lineno} is not JSON ({exc})") from exc
    if not rows:
        raise UserError(f"{path} holds no steps yet")
    return rows


def read_run(path: Path) -> tuple[str, list[dict]]:
    """(name, rows) of a run: a metrics.jsonl, or the folder of a coordinator state, a simulation or a baseline."""
    path = Path(path)
    if path.is_dir():
        found = [p for p in (path / "metrics.jsonl", path / "state" / "metrics.jsonl") if p.is_file()]
        if not found:
            raise UserError(f"{path} holds no metrics.jsonl (nor state/metrics.jsonl); give a run folder or the file")
        path = found[0]
    folder = path.parent.parent if path.parent.name == "state" else path.parent
    return folder.name or str(folder), read_jsonl(path)


#: ``fwdllm baseline`` records these under other names; read under the coordinator's, both kinds draw alike.
BASELINE_NAMES = {"train_loss": "loss", "heldout_loss": "eval_loss", "heldout_accuracy": "accuracy"}


def by_round(rows: list[dict]) -> list[dict]:
    """Rows with ``round``: the updates applied when the row was written, comparable across kinds of run.

    A coordinator row of step s follows s + 1 updates (step -1 is the bundle's θ); a baseline's row of
    round r follows r rounds and names its curves as in ``BASELINE_NAMES``.
    """
    if any("heldout_accuracy" in r for r in rows):
        return [{BASELINE_NAMES.get(k, k): v for k, v in r.items()} | {"round": r["step"]} for r in rows]
    return [r | {"round": r["step"] + 1} for r in rows]


PANELS = [
    ("loss", "train loss (devices)"),
    ("eval_loss", "held-out loss"),
    ("accuracy", "held-out accuracy"),
    ("perturbations", "perturbations per step"),
    ("variance", "split-half variance"),
    ("lr", "learning rate"),
]


def plot(rows: list[dict], out: Path, title: str = "") -> Path:
    """One run's curves (``plot_runs`` with a single unnamed run)."""
    return plot_runs([("", rows)], out, title)


def plot_runs(runs: list[tuple[str, list[dict]]], out: Path, title: str = "") -> Path:
    """A PNG with one panel per curve that some run has (loss, accuracy, perturbations, variance, lr), one line
    per run against the updates applied, so fwdllm runs and backprop baselines compare on one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(name, by_round(rows)) for name, rows in runs]
    present = [(k, label) for k, label in PANELS if any(_num(r.get(k)) is not None for _, rows in runs for r in rows)]
    if not present:
        raise UserError("the metrics hold no numeric curves to plot")
    fig, axes = plt.subplots(len(present), 1, figsize=(7, 2.2 * len(present)), sharex=True, squeeze=False)
    for ax, (key, label) in zip(axes[:, 0], present):
        for name, rows in runs:
            pts = [(r["round"], _num(r.get(key))) for r in rows if _num(r.get(key)) is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None, label=name)
        ax.set_ylabel(label, fontsize=8)
        if key == "variance":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    if len(runs) > 1:
        axes[0, 0].legend(fontsize=8)
    axes[-1, 0].set_xlabel("updates applied (steps, rounds)")
    if title:
        axes[0, 0].set_title(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _num(value):
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None
