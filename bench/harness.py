"""What the studies in bench/ share: cached bundles, data paths, kept θ files, and the in-process run.

A federated run in bench/ is the product's in-process simulator (fwdllm/simulate_inprocess.py: the
real coordinator and the device's own ``do_task``), re-exported here as ``run``; this module adds
only what benchmarks need around it.
"""

from __future__ import annotations

import fcntl
import subprocess
import sys
from pathlib import Path

from fwdllm.proto.names import Task
from fwdllm.simulate_inprocess import InProcessResult, run

__all__ = ["AG_NEWS", "BBC_LABELS", "CACHE", "THETAS", "InProcessResult", "bundle", "run", "theta_file"]

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
    task: str = Task.SEQ_CLS,
    label_words: bool = False,
) -> Path:
    """A bundle made by `fwdllm export`, cached under .cache/ (exports take minutes).

    ``label_words``: a causal-lm bundle that answers with ``labels`` as words (else open-ended).

    The export runs in a child process so this one never loads torch: a process's ru_maxrss
    starts at its parent's resident size (fork copies the high-water mark), which would
    inflate every memory measurement spawned from here.
    """
    words = "-words" if task == Task.CAUSAL_LM and label_words else ""
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
            if task == Task.SEQ_CLS or words:
                args += ["--label-names", ",".join(labels)]
            proc = subprocess.run([sys.executable, "-m", "fwdllm.cli", *args], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"fwdllm {' '.join(args)} failed: {proc.stderr.strip()[-500:]}")
    return out


def theta_file(run_name: str) -> Path:
    """Where the final θ of the run called ``run_name`` is kept (``HarnessResult.save_theta``)."""
    return THETAS / ("".join(c if c.isalnum() else "-" for c in run_name) + ".safetensors")
