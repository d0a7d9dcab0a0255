"""Decoders that learn: SmolLM2-135M + LoRA classifying BBC News with label words.

    python bench/decoder.py [--quick] [--seeds N] [--parts study,backprop,demo,demo-llama]

Four parts (what one perturbed evaluation costs is bench/decoder_cost.py, a timed section):

- **study**: the in-process federated harness (bench/harness.py: the real coordinator and engine)
  on ``bbc-lm``, 100 Dirichlet(0.5) clients, 10 per step, one variant per row: estimator (central
  or one-sided with N+1 passes), step rule (SGD with FwdLLM's decay, coordinator Adam, FZOO's
  division by the spread of the directional derivatives), perturbation distribution, variance
  control, trained layers. Final held-out accuracy (at the end of the run, never the best seen),
  suffix evaluations, device seconds and bytes; the chosen recipe over ``--seeds`` seeds.
- **backprop**: ``fwdllm baseline`` (FedSGD with server Adam) with LoRA on the same layers, same
  data, partition and clients, at the study's rounds and (with part demo) at the demo's.
- **demo**: ``make demo-llm SEED=s`` for ``--seeds`` seeds, the recipe through real coordinator and
  device processes with the coordinator's defaults (peer bound on); the goal is final held-out
  accuracy 25 points over zero-shot on average, within 10 minutes of training on 2 cores.
  **demo-llama**: the same on llama.cpp (a GGUF q8_0 bundle, the top-2 suffix GGUF), seed 0.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.harness import BBC_LABELS, bundle, run  # noqa: E402
from bench.report import RESULTS_DIR, write_results  # noqa: E402
from fwdllm.proto.names import DifferenceScheme, Distribution, Task, VarianceMode  # noqa: E402

DATA = "bbc-lm"
CLIENTS, PER_STEP, ALPHA = 100, 10, 0.5


def words_bundle(k: int) -> Path:
    return bundle("lora", f"top:{k}", 64, BBC_LABELS, model="smollm2", task=Task.CAUSAL_LM, label_words=True)


# ----- study ------------------------------------------------------------------------------------

#: name -> (top K, SimConfig fields, coordinator overrides). Perturbations per client and steps fix the
#: suffix evaluations; every variant gets the same budget of 2 × 10 × 4 × steps (central differences).
VARIANTS: dict[str, tuple[int, dict, dict]] = {
    # SGD's lr gives steps of Adam's length: the estimate's norm is 10-40 over 30,720 values (Adam moves each by 1e-2);
    # at lr 1e-3 θ moved by 1e-4 a value and held-out accuracy did not change in 60 steps.
    "sgd": (2, {"optimizer": "sgd", "lr": 0.1}, {}),
    "adam": (2, {"optimizer": "adam", "lr": 1e-2}, {}),
    "adam-lr3e-2": (2, {"optimizer": "adam", "lr": 3e-2}, {}),
    # the recipe with the coordinator's default peer bound on (what `make demo-llm` runs): the defence's cost
    "adam-lr3e-2-peer-bound": (2, {"optimizer": "adam", "lr": 3e-2}, {"aggregation": {"outlier": 5}}),
    # the two defences against a hostile peer at other settings, for a default that costs the recipe less: the
    # per-scalar bound at twice its multiple, and the per-client size bound in its place
    "adam-lr3e-2-peer-bound-10": (2, {"optimizer": "adam", "lr": 3e-2}, {"aggregation": {"outlier": 10}}),
    "adam-lr3e-2-client-rms-2": (
        2,
        {"optimizer": "adam", "lr": 3e-2},
        {"aggregation": {"outlier": 0, "client_rms": 2}},
    ),
    # twice the perturbations per client (so twice the suffix evaluations of the other rows): on AG News's head the
    # noise floor fell with more perturbations per step where more steps did not move it
    "adam-lr3e-2-peer-bound-8-perturbations": (
        2,
        {"optimizer": "adam", "lr": 3e-2, "perturbations": 8},
        {"aggregation": {"outlier": 5}},
    ),
    "adam-rademacher": (2, {"optimizer": "adam", "lr": 1e-2}, {"run": {"distribution": Distribution.RADEMACHER}}),
    # sparse v (spec version 2): only a seeded fraction of θ moves per perturbation, values scaled so E[vvᵀ] = I
    "adam-sparse-0.1": (
        2,
        {"optimizer": "adam", "lr": 3e-2},
        {"run": {"distribution": Distribution.SPARSE_GAUSSIAN_0_1}},
    ),
    "adam-sparse-0.01": (
        2,
        {"optimizer": "adam", "lr": 3e-2},
        {"run": {"distribution": Distribution.SPARSE_GAUSSIAN_0_01}},
    ),
    "adam-variance": (2, {"optimizer": "adam", "lr": 1e-2, "variance": VarianceMode.RELATIVE, "max_waves": 2}, {}),
    "fzoo": (
        2,
        {"optimizer": "sgd", "lr": 2e-2, "perturbations": 7},
        {"run": {"scheme": DifferenceScheme.FORWARD}, "optimizer": {"jvp_std": True}},
    ),
    # LoRA's A starts random (B at zero): its estimate is pure noise until B grows, and Adam moves every value by about
    # lr a step whatever the signal, so A random-walks away from its initialisation; here only B is updated.
    "adam-freeze-a": (
        2,
        {"optimizer": "adam", "lr": 1e-2},
        {"optimizer": {"groups": [{"match": "*lora_A*", "lr_scale": 0.0}]}},
    ),
    "adam-top1": (1, {"optimizer": "adam", "lr": 1e-2}, {}),
    "adam-top4": (4, {"optimizer": "adam", "lr": 1e-2}, {}),
}


UNBOUNDED = {"aggregation": {"outlier": 0}}
RUNS = RESULTS_DIR / "decoder-runs"  # one JSON per finished run: reruns and parallel invocations reuse them


def study_run(name: str, seed: int, steps: int, eval_limit: int) -> dict:
    """One variant's run (kept in RUNS, so an interrupted or split study only runs what is missing)."""
    kept = RUNS / f"{name}-s{seed}-{steps}steps-limit{eval_limit}.json"
    if kept.is_file():
        return json.loads(kept.read_text())
    result = _study_run(name, seed, steps, eval_limit)
    RUNS.mkdir(parents=True, exist_ok=True)
    kept.write_text(json.dumps(result))
    return result


def _study_run(name: str, seed: int, steps: int, eval_limit: int) -> dict:
    from fwdllm.simulate import SimConfig
    from fwdllm.simulate_inprocess import merge

    k, fields, overrides = VARIANTS[name]
    cfg = {"perturbations": 4, "epsilon": 1e-3, **fields}
    sim = SimConfig(
        bundle=str(words_bundle(k)),
        data=DATA,
        clients=CLIENTS,
        per_step=PER_STEP,
        steps=steps,
        batch_size=8,
        alpha=ALPHA,
        seed=seed,
        eval_every=max(1, steps // 5),
        eval_limit=eval_limit,
        **cfg,
    )
    t = time.perf_counter()
    # Estimators are compared on the plain mean of the scalars: the coordinator's default peer bound
    # (aggregation.outlier) is a defence whose cost `make demo-llm` measures, so it is off here.
    result = run(sim, merge(UNBOUNDED, overrides), desc=f"{name} seed {seed}")
    evaluations = sum(r["perturbations"] for r in result.rows) * (
        2 if overrides.get("run", {}).get("scheme") != DifferenceScheme.FORWARD else 1
    )
    if overrides.get("run", {}).get("scheme") == DifferenceScheme.FORWARD:
        evaluations += steps * PER_STEP  # f(θ) once per task
    return {
        "variant": name,
        "seed": seed,
        "K": k,
        "zero_shot": result.before.get("test_accuracy"),
        "final": result.final.get("test_accuracy"),
        "final_loss": result.final.get("test_loss"),
        "suffix_evaluations": evaluations,
        "device_s": round(sum(r["device_seconds"] for r in result.rows), 1),
        "bytes_up": int(sum(r["bytes_up"] for r in result.rows)),
        "bytes_down": int(sum(r["bytes_down"] for r in result.rows)),
        "wall_s": round(time.perf_counter() - t, 1),
        "curve": [(r["step"] + 1, r["test_accuracy"]) for r in result.evals()],
    }


def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    for name in dict.fromkeys(r["variant"] for r in runs):
        group = [r for r in runs if r["variant"] == name]
        finals = [r["final"] for r in group]
        rows.append(
            {
                "variant": name,
                "K": group[0]["K"],
                "steps": group[0]["curve"][-1][0],
                "seeds": len(group),
                "zero-shot": round(group[0]["zero_shot"], 3),
                "final accuracy": f"{np.mean(finals):.3f} ± {np.std(finals):.3f}"
                if len(group) > 1
                else f"{finals[0]:.3f}",
                "suffix evaluations": group[0]["suffix_evaluations"],
                "device s": round(float(np.mean([r["device_s"] for r in group])), 1) if group[0]["device_s"] else None,
                "KB up": round(group[0]["bytes_up"] / 1024, 1),
                "KB down": round(group[0]["bytes_down"] / 1024, 1),
            }
        )
    return rows


def plot(runs: list[dict], baseline: list[dict], path: Path) -> Path:
    """Held-out accuracy along every run: the estimators (in one process) on the left, `make demo-llm`'s runs on the
    right, each beside backprop at the same rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    is_demo = [r["variant"].startswith("make demo-llm") for r in runs]
    study = [r for r, demo in zip(runs, is_demo) if not demo]
    demos = [r for r, demo in zip(runs, is_demo) if demo]
    panels = [(p, t) for p, t in ((study, "estimators, one process"), (demos, "make demo-llm, real processes")) if p]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 6), sharey=True, squeeze=False)
    for ax, (panel, title) in zip(axes[0], panels):
        names = list(dict.fromkeys(r["variant"] for r in panel))
        colours = plt.get_cmap("tab10" if len(names) <= 10 else "tab20").colors
        for colour, name in enumerate(names):
            for i, r in enumerate(x for x in panel if x["variant"] == name):
                steps, acc = zip(*[(0, r["zero_shot"])] + [tuple(p) for p in r["curve"]])
                ax.plot(steps, acc, label=name if i == 0 else None, alpha=0.85, color=colours[colour % len(colours)])
        rounds = max(r["curve"][-1][0] for r in panel)
        for b in (b for b in baseline if b["curve"][-1][0] == rounds):
            ax.plot(*zip(*b["curve"]), "k--", label=backprop_name(b))
        ax.set_xlabel("step (10 clients each)")
        ax.set_title(f"{title}, {rounds} steps", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    axes[0][0].set_ylabel("held-out accuracy")
    fig.suptitle("SmolLM2-135M + LoRA (top 2 layers), BBC News as label words")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----- make demo-llm ----------------------------------------------------------------------------


def demo_name(backend: str) -> str:
    flag = "" if backend == "onnxruntime" else f" LLM_BACKEND={backend}"
    return f"make demo-llm{flag} (real processes, peer bound)"


def demo_run(seed: int, backend: str = "onnxruntime") -> dict:
    """`make demo-llm SEED=seed LLM_BACKEND=backend`: the demo itself, a coordinator and device processes over
    loopback gRPC."""
    kept = RUNS / f"make-demo-llm{'' if backend == 'onnxruntime' else '-' + backend}-s{seed}.json"
    if kept.is_file():
        return json.loads(kept.read_text())
    make = ["make", "demo-llm", f"SEED={seed}", f"LLM_BACKEND={backend}"]
    subprocess.run(make, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    result = demo_result(ROOT / "runs" / (f"demo-llm-{backend}" + (f"-seed{seed}" if seed else "")), seed, backend)
    RUNS.mkdir(parents=True, exist_ok=True)
    kept.write_text(json.dumps(result))
    return result


def demo_result(folder: Path, seed: int, backend: str = "onnxruntime") -> dict:
    """What a finished `make demo-llm` run folder shows."""
    summary = json.loads((folder / "summary.json").read_text())
    rows = [json.loads(line) for line in (folder / "state" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] >= 0 and "step_time_s" in r]
    return {
        "variant": demo_name(backend),
        "seed": seed,
        "K": 2,
        "zero_shot": summary["before"]["accuracy"],
        "final": summary["after"]["accuracy"],
        "suffix_evaluations": 2 * summary["perturbations"],
        "device_s": None,  # the coordinator's metrics hold steps' times, not devices' seconds
        "training_s": round(sum(r["step_time_s"] for r in steps), 1),
        "bytes_up": summary["bytes_up"],
        "bytes_down": summary["bytes_down"],
        "wall_s": round(summary["wall_s"], 1),
        "curve": [(r["step"] + 1, r["accuracy"]) for r in rows if r["step"] >= 0 and "accuracy" in r],
    }


# ----- backprop ---------------------------------------------------------------------------------


def backprop_name(b: dict) -> str:
    return f"backprop LoRA top-{b['K']} (FedSGD, Adam 3e-3), {b['curve'][-1][0]} rounds"


def backprop(k: int, steps: int, seed: int, eval_limit: int) -> dict:
    from fwdllm.baselines import BaselineConfig, run_baseline

    cfg = BaselineConfig(
        data=DATA,
        peft="lora",
        model="smollm2",
        trainable_layers=f"top:{k}",
        clients=CLIENTS,
        per_step=PER_STEP,
        steps=steps,
        alpha=ALPHA,
        batch_size=8,
        lr=3e-3,
        eval_every=max(1, steps // 5),
        eval_limit=eval_limit or None,
        seed=seed,
    )
    kept = RUNS / f"backprop-top{k}-s{seed}-{steps}steps-limit{eval_limit}.json"
    if kept.is_file():
        return json.loads(kept.read_text())
    out = RUNS / f"backprop-top{k}-s{seed}-{steps}steps"
    t = time.perf_counter()
    records = run_baseline(cfg, out, progress=False)
    evals = [r for r in records if r.get("heldout_accuracy") is not None]
    result = {
        "K": k,
        "seed": seed,
        "zero_shot": evals[0]["heldout_accuracy"],
        "final": evals[-1]["heldout_accuracy"],
        "bytes_up": records[-1].get("bytes_up"),
        "device_s": round(records[-1]["device_seconds"], 1),
        "peak_rss_mib": records[-1].get("peak_rss_mib"),
        "wall_s": round(time.perf_counter() - t, 1),
        "curve": [(r["step"], r["heldout_accuracy"]) for r in evals],
    }
    kept.write_text(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="top-2 cost with 2 repeats and one 4-step run (CI)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the chosen recipe (default 3)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument(
        "--recipe",
        default="adam-lr3e-2,adam-lr3e-2-peer-bound,adam-lr3e-2-peer-bound-10,adam-lr3e-2-client-rms-2",
        help="variants run for every seed, the chosen recipe first (default: it without and with each defence)",
    )
    parser.add_argument("--variants", default=",".join(VARIANTS), help="variants run once, seed 0")
    parser.add_argument(
        "--parts",
        default="study,backprop,demo,demo-llama",
        help="study, backprop, demo (`make demo-llm SEED=s` for --seeds seeds, about 7 minutes each), demo-llama "
        "(`make demo-llm LLM_BACKEND=llama.cpp`, seed 0)",
    )
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    notes, runs, baseline = [], [], []
    steps, limit = (4, 40) if args.quick else (args.steps, 0)
    recipes = [n for n in args.recipe.split(",") if n]
    if "study" in parts:
        names = (
            recipes[:1] if args.quick else list(dict.fromkeys([*recipes, *(n for n in args.variants.split(",") if n)]))
        )
        for name in names:
            runs.append(study_run(name, 0, steps, limit))
        for seed in range(1, 1 if args.quick else args.seeds):
            runs.extend(study_run(name, seed, steps, limit) for name in recipes)
    if "demo" in parts and not args.quick:
        demos = [demo_run(seed) for seed in range(args.seeds)]
        runs.extend(demos)
        gain = np.mean([d["final"] - d["zero_shot"] for d in demos])
        notes.append(
            f"`make demo-llm` over {len(demos)} seeds: final "
            + ", ".join(f"{d['final']:.3f}" for d in demos)
            + f" from zero-shot {demos[0]['zero_shot']:.3f}, {100 * gain:+.1f} points on average; training (the steps' "
            f"times) {', '.join(str(d['training_s']) for d in demos)} s, whole runs "
            f"{', '.join(str(d['wall_s']) for d in demos)} s."
        )
    if "demo-llama" in parts and not args.quick:  # the same recipe on the GGUF q8_0 bundle, seed 0
        run = demo_run(0, "llama.cpp")
        runs.append(run)
        notes.append(
            f"`make demo-llm LLM_BACKEND=llama.cpp` (seed 0): {run['zero_shot']:.3f} → {run['final']:.3f}, training "
            f"{run['training_s']} s, whole run {run['wall_s']} s."
        )
    if "backprop" in parts and not args.quick:
        k = VARIANTS[recipes[0]][0]
        demo_steps = [demos[0]["curve"][-1][0]] if "demo" in parts else []  # the demo's rounds, from its run
        baseline.extend(backprop(k, n, 0, limit) for n in dict.fromkeys([steps, *demo_steps]))
    rows = summarise(runs)
    for b in baseline:
        rows.append(
            {
                "variant": backprop_name(b),
                "K": b["K"],
                "steps": b["curve"][-1][0],
                "seeds": 1,
                "zero-shot": round(b["zero_shot"], 3),
                "final accuracy": f"{b['final']:.3f}",
                "device s": b.get("device_s"),
                "KB up": round((b["bytes_up"] or 0) / 1024, 1),
            }
        )
    if runs:
        figure = plot(
            runs, baseline, ROOT / "bench" / "figures" / ("decoder-quick.png" if args.quick else "decoder.png")
        )
        notes.append(f"Figure: `{figure.relative_to(ROOT)}` (held-out accuracy along every run).")
    cmd = "python bench/decoder.py" + (" --quick" if args.quick else f" --seeds {args.seeds} --steps {args.steps}")
    columns = [
        "variant",
        "K",
        "steps",
        "seeds",
        "zero-shot",
        "final accuracy",
        "suffix evaluations",
        "device s",
        "KB up",
        "KB down",
    ]
    path = write_results("decoder", cmd, rows, columns, notes="\n".join(f"- {n}" for n in notes))
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
