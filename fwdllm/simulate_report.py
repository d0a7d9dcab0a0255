"""What `fwdllm simulate` reads back from a run folder: the coordinator's metrics rows, and the Markdown report."""

from __future__ import annotations

import json
from pathlib import Path

from fwdllm.sim_config import SimConfig


def metrics_rows(path: Path) -> list[dict]:
    """The coordinator's metrics rows so far; a line still being written is left for the next look."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def applied_steps(rows: list[dict]) -> list[dict]:
    """The rows of applied steps (the coordinator's step -1 row is the initial evaluation)."""
    return [r for r in rows if r["step"] >= 0]


def fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def report_markdown(cfg: SimConfig, s: dict, rows: list[dict]) -> str:
    b, a = s["before"], s["after"]
    evals = [r for r in rows if r.get("accuracy") is not None]
    lines = [
        f"# fwdllm simulation: {cfg.data}",
        "",
        f"Bundle `{cfg.bundle}`, backend {cfg.backend}; {cfg.clients} clients "
        f"({'IID' if cfg.alpha is None else f'Dirichlet α={cfg.alpha}'}), {cfg.per_step} per step, "
        f"{cfg.perturbations} perturbation(s) per client, batch {cfg.batch_size}; "
        f"optimizer {cfg.optimizer} lr {cfg.lr} ({cfg.schedule}); variance control {cfg.variance}, "
        f"sampler {'on' if cfg.sampler else 'off'}; seed {cfg.seed}.",
        "",
        "| | before | after |",
        "|---|---|---|",
        f"| held-out accuracy | {fmt(b.get('accuracy'))} | {fmt(a.get('accuracy'))} |",
        f"| held-out loss | {fmt(b.get('eval_loss'))} | {fmt(a.get('eval_loss'))} |",
        "",
        f"{s['steps']} steps, {s['perturbations']:,} perturbations, {s['wall_s']:.0f} s wall time; devices uploaded "
        f"{s['bytes_up']:,} bytes and downloaded {s['bytes_down']:,} bytes in all.",
        "",
        "![convergence](convergence.png)",
        "",
    ]
    if evals:
        lines += ["| step | held-out accuracy | held-out loss |", "|---|---|---|"]
        lines += [f"| {r['step'] + 1} | {fmt(r.get('accuracy'))} | {fmt(r.get('eval_loss'))} |" for r in evals]
    return "\n".join(lines) + "\n"
