"""Export cost: wall time and bundle size per model × format × precision (one `fwdllm export` each).

    python bench/export.py            # MiniLM (ONNX, TFLite) and SmolLM2 (ONNX, GGUF)
    python bench/export.py --quick    # MiniLM only, head-free LoRA top:2 at small TFLite shapes

Each row is a separate export into a temporary folder, so its time includes loading the
checkpoint, the PyTorch reference and the validation run; `graph s` is the format's own
steps (trace/convert, quantize, validate) from the manifest's `export_timings_s`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.report import write_results  # noqa: E402
from fwdllm.proto.names import Task

MINILM = dict(model="minilm", task=Task.SEQ_CLS, num_labels=4, method="lora")
SMOLLM2 = dict(model="smollm2", task=Task.CAUSAL_LM, method="lora")
FULL = [
    (MINILM, "onnx", "fp32"),
    (MINILM, "onnx", "int8"),
    (MINILM, "tflite", "fp32"),
    (MINILM, "tflite", "int8"),
    (SMOLLM2, "onnx", "fp32"),
    (SMOLLM2, "gguf", "f16"),
    (SMOLLM2, "gguf", "q8_0"),
    (SMOLLM2, "gguf", "q4_0"),
]
QUICK = [(MINILM, "onnx", "fp32"), (MINILM, "onnx", "int8"), (MINILM, "tflite", "fp32"), (MINILM, "tflite", "int8")]


def run_one(cfg: dict, fmt: str, precision: str, quick: bool) -> dict:
    from fwdllm.export.pipeline import ExportRequest, export
    from fwdllm.export.plan import PeftOptions

    shapes = dict(batch_size=2, seq_len=16, perturbations=2) if quick else {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bundle"
        start = time.perf_counter()
        m = export(
            ExportRequest(
                model=cfg["model"],
                task=cfg["task"],
                out=out,
                formats=[fmt],
                precisions=[precision],
                num_labels=cfg.get("num_labels"),
                peft=PeftOptions(method=cfg["method"], trainable_layers="top:2" if quick else "all"),
                **shapes,
            )
        )
        wall = time.perf_counter() - start
        graphs = [g for g in m.graphs if g.format == fmt]
        graph_mib = sum((out / g.file).stat().st_size for g in graphs) / 2**20
        bundle_mib = sum(p.stat().st_size for p in out.iterdir()) / 2**20
        steps = m.model.extra["export_timings_s"]
        errs = [g.validation["max_rel_err"] for g in graphs if "max_rel_err" in g.validation]
    return {
        "model": cfg["model"],
        "peft": cfg["method"],
        "format": fmt,
        "precision": precision,
        "export s": round(wall, 1),
        "graph s": round(sum(v for k, v in steps.items() if k.startswith(fmt)), 1),
        "graph MiB": round(graph_mib, 1),
        "bundle MiB": round(bundle_mib, 1),
        "θ dim": m.theta.dim,
        "validation rel err": max(errs) if errs else "n/a (not run in llama.cpp at export)",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = []
    for cfg, fmt, precision in QUICK if args.quick else FULL:
        rows.append(run_one(cfg, fmt, precision, args.quick))
        print(rows[-1], flush=True)
    write_results(
        "export",
        f"python bench/export.py{' --quick' if args.quick else ''}",
        rows,
        [
            "model",
            "peft",
            "format",
            "precision",
            "export s",
            "graph s",
            "graph MiB",
            "bundle MiB",
            "θ dim",
            "validation rel err",
        ],
        notes="One export per row (LoRA r=8 on query/value; all layers, or top:2 in --quick, which adds prefix/suffix "
        "graphs). TFLite shapes B=8, S=64, P=8 (2/16/2 in --quick). `graph MiB` counts that format's graph files; the "
        "bundle adds θ and tokenizer.json. SmolLM2's HF checkpoint is "
        "converted from the shipped GGUF once and cached (~/.cache/fwdllm).",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
