"""AG News final accuracy over seeds: fwdllm's best head recipe run longer, beside backprop's head.

    python bench/agnews.py                  # 3 seeds (about 40 minutes on 2 busy cores)
    python bench/agnews.py --quick          # one short seed, to check the script runs

bench/time_to_accuracy.py follows one seed over time; this judges the recipes as the project does:
held-out accuracy at the END of each run, mean and spread over seeds (each seed its own Dirichlet
partition and perturbations), on the whole held-out split. fwdllm's head recipe (variance control
and the sampler) runs at its time-to-accuracy length and, for one seed, three times that, and with twice the
perturbations per client at that length; backprop's
head (FedAvg) at its own length. Runs are kept one JSON
file each in results/agnews-runs, so an interrupted study resumes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.report import RESULTS_DIR, write_results  # noqa: E402
from bench.time_to_accuracy import AGNEWS, FWD_VARIANTS, HEAD_200, curve_backprop, curve_fwdllm  # noqa: E402

RECIPE = "fwdllm head, variance control + sampler"
RUNS = RESULTS_DIR / "agnews-runs"
# (row name, fwdllm variant or "backprop head", steps, seeds: None for --seeds). Three times the steps did not
# move seed 0 (0.848 -> 0.849 for 8x the device seconds), so the long run is kept at one seed.
STUDY = [
    (f"{RECIPE}, 40 steps", RECIPE, 40, None),
    (f"{RECIPE}, 120 steps", RECIPE, 120, 1),
    # twice the perturbations per client: the plateau above is the estimate's noise (seed-0 probes at 40 steps:
    # 200 perturbations 0.855; server Adam lr 1e-2 / 3e-2 with the same waves + sampler 0.830 / 0.837)
    (f"{HEAD_200}, 40 steps", HEAD_200, 40, None),
    ("backprop head (FedAvg), 60 rounds", "backprop head", 60, None),
]


def one_run(name: str, variant: str, steps: int, seed: int, quick: bool) -> dict:
    """The run's final point (accuracy, device seconds, bytes), kept in RUNS."""
    kept = RUNS / f"{name}-s{seed}{'-quick' if quick else ''}.json".replace(" ", "_").replace(",", "")
    if kept.is_file():
        return json.loads(kept.read_text())
    from fwdllm.data.partition import open_federated

    common = {"clients": 100, "per_step": 10, "alpha": 0.5, "seed": seed, "eval_every": steps, "eval_limit": 0}
    if quick:
        common.update(clients=20, per_step=4, eval_limit=64)
        steps = 3
        common["eval_every"] = steps
    fed = open_federated(AGNEWS, common["clients"], alpha=common["alpha"], seed=seed)
    if variant.startswith("backprop "):
        points = curve_backprop(variant.split()[1], fed, steps, common, progress=False)
    else:
        points, _ = curve_fwdllm(name, FWD_VARIANTS[variant], AGNEWS, fed.labels, steps, common, progress=False)
    final = {k: points[-1][k] for k in ("step", "accuracy", "device_seconds", "bytes")}
    RUNS.mkdir(parents=True, exist_ok=True)
    kept.write_text(json.dumps({"name": name, "seed": seed, **final}) + "\n")
    return json.loads(kept.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args(argv)
    rows = []
    for name, variant, steps, seeds in STUDY:
        count = 1 if args.quick else seeds or args.seeds
        runs = [one_run(name, variant, steps, seed, args.quick) for seed in range(count)]
        acc = [r["accuracy"] for r in runs]
        rows.append(
            {
                "configuration": name,
                "seeds": len(runs),
                "final accuracy": f"{statistics.mean(acc):.3f} ± {statistics.pstdev(acc):.3f}",
                "per seed": ", ".join(f"{a:.3f}" for a in acc),
                "device s": f"{statistics.mean(r['device_seconds'] for r in runs):.0f}",
                "MB up + down": f"{statistics.mean(r['bytes'] for r in runs) / 1e6:.2f}",
            }
        )
    notes = (
        "AG News test.csv (7,600 articles, seeded 80/20 split), MiniLM-L6, sequence 64, batch 8, 100 non-IID clients "
        "(Dirichlet α=0.5, a new partition per seed), 10 per step; accuracy on all 1,520 held-out articles at the end "
        "of each run; mean ± population standard deviation over seeds. fwdllm: the head over the frozen encoder "
        "(prefix reuse), SGD lr 2 with linear decay over the run, 100 perturbations per client, variance control "
        "(relative, up to 4 waves) and the sampler; the '200 perturbations' row the same with 200 per client and "
        "wave. Backprop: FedAvg of the same head, one local SGD step per "
        "round and server Adam at its default rate (fwdllm/baselines.py). Device seconds and bytes: all clients, "
        "mean per run."
    )
    cmd = "python bench/agnews.py" + (" --quick" if args.quick else f" --seeds {args.seeds}")
    columns = ["configuration", "seeds", "final accuracy", "per seed", "device s", "MB up + down"]
    path = write_results("agnews", cmd, rows, columns, notes)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
