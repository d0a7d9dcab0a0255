"""Shared output for benchmark scripts: a JSON result file and a Markdown table, with the machine stated.

Every bench script measures ratios side by side in one run (these machines are noisy) and
calls `write_results` so `make bench` can assemble BENCHMARKS.md from the pieces.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# The distributions whose versions decide the numbers: runtimes, the backprop baseline, the generator's numpy.
VERSIONED = ("fwdllm", "numpy", "onnxruntime", "ai-edge-litert", "llama_cpp_python", "torch", "transformers", "grpcio")


def machine() -> dict:
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "versions": versions(),
        "platform": platform.platform(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def versions() -> dict[str, str]:
    """Installed version of each of VERSIONED (read from package metadata: nothing is imported)."""
    from importlib import metadata

    out = {}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of fn over repeats (after warmup calls)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def write_results(
    name: str, command: str, rows: list[dict], columns: list[str], notes: str = "", measured: dict | None = None
) -> Path:
    """Write results/<name>.json and results/<name>.md; return the Markdown path.

    ``measured``: the machine record of the run that measured ``rows``, when they are written again (new notes)
    rather than measured now, so the report still says when and where they were measured.
    """
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    doc = {"name": name, "command": command, "machine": measured or machine(), "rows": rows, "notes": notes}
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    md = f"`{command}`\n\n{markdown_table(rows, columns)}\n"
    if notes:
        md += f"\n{notes}\n"
    path = RESULTS_DIR / f"{name}.md"
    path.write_text(md)
    return path
