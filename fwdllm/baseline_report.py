"""A backprop baseline's run folder gets what ``fwdllm simulate`` leaves in its own: ``convergence.png`` and
``report.md``, so a baseline and a forward-gradient run of the same task can be read side by side.

The plot is the coordinator's (``fwdllm.coordinator.metrics.plot``), which reads baseline records under the
coordinator's metric names, so both kinds of run draw the same panels and `fwdllm plot` draws them together.
"""

from __future__ import annotations

import json
from pathlib import Path

PLOT_FILE = "convergence.png"
REPORT_FILE = "report.md"


def write_report(out: Path, config: dict, records: list[dict]) -> Path:
    """Write ``out/convergence.png`` and ``out/report.md`` from a run's ``config.json`` content and records."""
    from fwdllm.coordinator.metrics import plot

    out = Path(out)
    title = f"{config['data']}: backprop {config['peft']}, {config['clients']} clients, {config['per_step']} per round"
    plot(records, out / PLOT_FILE, title=title)
    (out / REPORT_FILE).write_text(_markdown(config, records))
    return out / REPORT_FILE


def _markdown(c: dict, records: list[dict]) -> str:
    first, last = records[0], records[-1]
    # label words: round 0 is the pretrained decoder (every PEFT starts as the identity);
    # a classifier's head starts at zero
    start = "round 0 (zero-shot)" if c.get("label_words") else "round 0 (zero head)"
    local = "FedSGD: one local step" if c["local_steps"] == 1 else f"FedAvg: {c['local_steps']} local SGD steps"
    skew = "IID" if c["alpha"] is None else f"Dirichlet α={c['alpha']}"
    words = f"; label words {', '.join(c['label_words'])}" if c.get("label_words") else ""
    lines = [
        f"# fwdllm backprop baseline: {c['data']}",
        "",
        f"Model `{c['model']}`, {c['peft']} on layers {c['trainable_layers']} ({c['num_trainable']:,} trainable "
        f"values){words}; {c['clients']} clients ({skew}), {c['per_step']} per round, batch {c['batch_size']}, "
        f"sequence {c['seq_len']}; {local} at local lr {c['local_lr']}, "
        f"server {c['optimizer']} lr {c['lr']}; seed {c['seed']}.",
        "",
        f"| | {start} | round {last['step']} |",
        "|---|---|---|",
        f"| held-out accuracy | {first['heldout_accuracy']:.3f} | {last['heldout_accuracy']:.3f} |",
        f"| held-out loss | {first['heldout_loss']:.3f} | {last['heldout_loss']:.3f} |",
        "",
        f"Held-out: {c['heldout_examples']:,} examples. {last['step']} rounds, {last['wall_seconds']:.0f} s wall time "
        f"(training and evaluation, after loading), {last['device_seconds']:.0f} s of it clients' forward and backward "
        f"passes. Clients uploaded {last['bytes_up']:,} bytes in all ({c['num_trainable'] * 4:,} per client per round: "
        f"every trainable value as float32). Peak RSS {last['peak_rss_mib']:,.0f} MiB (the whole process: every "
        "client in turn, and evaluation).",
        "",
        f"![convergence]({PLOT_FILE})",
        "",
        "| round | held-out accuracy | held-out loss | train loss |",
        "|---|---|---|---|",
        *(
            f"| {r['step']} | {r['heldout_accuracy']:.3f} | {r['heldout_loss']:.3f} | "
            f"{'-' if r['train_loss'] is None else format(r['train_loss'], '.3f')} |"
            for r in records
        ),
        "",
        "Configuration (`config.json`):",
        "",
        "```json",
        json.dumps({k: v for k, v in c.items() if k != "partition"}, indent=1),
        "```",
        "",
    ]
    return "\n".join(lines)
