"""llama.cpp prefix reuse: one perturbed evaluation of a label-word batch, uncut vs the suffix GGUF.

    python bench/llama_prefix.py [--repeats 7] [--threads 1] [--precision q8_0] [--layers 2,4]

SmolLM2-135M answering BBC topics with label words, LoRA (r=8, q/v) on the top K layers, exported
by `fwdllm export --format gguf` (cached under .cache/), 8 held-out `bbc-lm` prompts (~34 tokens).
Per K, interleaved repeats of, each at a new θ:
- uncut: set θ as the base model's adapter, 8 decodes through all 30 layers and the vocabulary head, the loss;
- suffix: set θ as the suffix GGUF's adapter, 8 decodes of the top K layers from cached hidden states, the loss;
- suffix, cold cache: the same after forgetting the hidden states, so the prefix runs for all 8 prompts;
- the adapter switch alone on each model.
Both give the same loss (the largest difference is reported). Every step is timed on the wall clock
and as the process's CPU time: llama.cpp runs on the calling thread here, so CPU time is what the
evaluation costs even when other work shares the cores and stretches the wall clock.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.harness import bundle  # noqa: E402
from bench.report import write_results  # noqa: E402
from fwdllm.export.gguf import PRECISIONS as GGUF_PRECISIONS  # noqa: E402
from fwdllm.proto.names import Precision, Task  # noqa: E402

BBC_WORDS = ["business", "entertainment", "politics", "sports", "tech"]
COLUMNS = [
    "layers",
    "precision",
    "clock",
    "tokens",
    "uncut_eval_s",
    "suffix_eval_s",
    "speedup",
    "suffix_cold_eval_s",
    "prefix_ms_per_example",
    "switch_ms_uncut",
    "switch_ms_suffix",
    "max_loss_diff",
]
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def prompts_batch(backend, n: int):
    from fwdllm.data.datasets import load_dataset
    from fwdllm.device_runtime.examples import Example

    examples = load_dataset("bbc-lm").heldout[:n]
    return backend.tokenizer().batch([Example(prompt=e["prompt"], label=BBC_WORDS.index(e["label"])) for e in examples])


def measure(bundle_dir: Path, k: int, args) -> list[dict]:
    from fwdllm.device_runtime.backend import open_backend
    from fwdllm.proto.manifest import load_manifest, load_theta

    manifest = load_manifest(bundle_dir)
    uncut = open_backend(
        bundle_dir, "llama.cpp", args.precision, {"threads": args.threads, "prefix_reuse": False}, manifest
    )
    cut = open_backend(bundle_dir, "llama.cpp", args.precision, {"threads": args.threads}, manifest)
    if cut.cut is None:
        raise RuntimeError(f"{bundle_dir} has no suffix GGUF at {args.precision}; re-export it")
    batch = prompts_batch(cut, args.prompts)
    theta0 = load_theta(bundle_dir, manifest)
    rng = np.random.default_rng(0)
    steps = ("uncut", "suffix", "cold", "switch_uncut", "switch_suffix")
    times = {(clock, name): [] for clock in CLOCKS for name in steps}
    diffs = []

    def timed(name, fn, keep):
        t0 = {clock: now() for clock, now in CLOCKS.items()}
        out = fn()
        for clock, now in CLOCKS.items():
            if keep:
                times[clock, name].append(now() - t0[clock])
        return out

    for r in range(args.repeats + 1):  # the first round warms up
        theta = (theta0 + 0.01 * rng.standard_normal(theta0.size)).astype(np.float32)
        keep = r > 0
        a = timed("uncut", lambda theta=theta: uncut.losses(batch, theta[None])[0], keep)
        b = timed("suffix", lambda theta=theta: cut.losses(batch, theta[None])[0], keep)
        cut.clear_cache()
        c = timed("cold", lambda theta=theta: cut.losses(batch, theta[None])[0], keep)
        timed("switch_uncut", lambda theta=theta: uncut.set_theta(theta), keep)
        timed("switch_suffix", lambda theta=theta: cut.set_theta(theta), keep)
        diffs += [abs(float(a) - float(b)), abs(float(a) - float(c))]
    uncut.close()
    cut.close()
    rows = []
    for clock in CLOCKS:
        med = {name: statistics.median(times[clock, name]) for name in steps}
        rows.append(
            {
                "layers": f"top:{k}",
                "precision": args.precision,
                "clock": clock,
                "tokens": int(batch.attention_mask.sum()),
                "uncut_eval_s": med["uncut"],
                "suffix_eval_s": med["suffix"],
                "speedup": med["uncut"] / med["suffix"],
                "suffix_cold_eval_s": med["cold"],
                "prefix_ms_per_example": 1000 * (med["cold"] - med["suffix"]) / batch.size,
                "switch_ms_uncut": 1000 * med["switch_uncut"],
                "switch_ms_suffix": 1000 * med["switch_suffix"],
                "max_loss_diff": max(diffs),
            }
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--precision", default=Precision.Q8_0, choices=list(GGUF_PRECISIONS))
    parser.add_argument("--layers", default="2,4", help="K of the top:K bundles to measure")
    parser.add_argument("--quick", action="store_true", help="3 repeats, top:2 only")
    args = parser.parse_args(argv)
    layers = [int(k) for k in args.layers.split(",")]
    if args.quick:
        args.repeats, layers = 3, [2]
    rows = []
    for k in layers:
        bundle_dir = bundle(
            "lora",
            layers=f"top:{k}",
            model="smollm2",
            formats="gguf",
            precision=args.precision,
            task=Task.CAUSAL_LM,
            labels=BBC_WORDS,
            label_words=True,
        )
        rows += measure(bundle_dir, k, args)
    notes = (
        f"{args.prompts} held-out bbc-lm prompts ({rows[0]['tokens']} tokens in all), {args.threads} thread(s), "
        f"medians of {args.repeats} interleaved repeats, each at a new θ; `clock` cpu = process CPU time, wall = "
        "elapsed. `*_eval_s` = set θ (adapter file + llama_adapter_lora_init) + one decode per prompt + the loss. "
        "`suffix` runs the top K layers from the cached hidden states; `suffix_cold` also runs the prefix (the base "
        "model, stopped after the last frozen layer) for every prompt, as the first "
        "perturbation of a new batch does; `prefix_ms_per_example` = (cold − cached) / prompts."
    )
    command = "python bench/llama_prefix.py" + (" --quick" if args.quick else "")
    path = write_results("llama_prefix", command, rows, COLUMNS, notes)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
