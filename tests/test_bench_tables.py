"""bench/time_to_accuracy.py and bench/recipe.py: how curves become the report's cells and verdicts."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.recipe import summarise  # noqa: E402
from bench.time_to_accuracy import first_reaching, target_rows, verdict  # noqa: E402


def _pts(*triples):
    return [{"step": s, "accuracy": a, "device_seconds": sec, "bytes": b} for s, a, sec, b in triples]


CURVES = {
    "fwdllm head": _pts((0, 0.25, 0, 0), (5, 0.72, 10.0, 2_000), (10, 0.81, 20.0, 4_000)),
    "backprop head": _pts((0, 0.25, 0, 0), (2, 0.83, 4.0, 400_000)),
}


def test_first_reaching_takes_the_first_evaluation_at_or_above_the_target():
    assert first_reaching(CURVES["fwdllm head"], 0.72)["step"] == 5
    assert first_reaching(CURVES["fwdllm head"], 0.80)["step"] == 10
    assert first_reaching(CURVES["fwdllm head"], 0.90) is None


def test_target_cells_and_verdict_state_where_fwdllm_loses_and_wins():
    row = target_rows("fwdllm head", CURVES["fwdllm head"], targets=(0.7, 0.9))
    assert row["≥0.7"] == "5 steps, 10 s, 0.00 MB" and row["≥0.9"] == "not reached" and row["final acc"] == 0.81
    text = verdict(CURVES)
    # 0.8: fwdllm 20 s vs backprop 4 s (5x the compute) but 4 kB vs 400 kB (0.01x the bytes)
    assert "≥0.8: fwdllm (fwdllm head) needs 5.0× the device seconds and 0.01× the bytes of backprop head" in text
    assert "≥0.875" not in text  # nobody reached it: no claim


def test_recipe_summary_is_judged_on_final_accuracy_not_the_best_seen():
    runs = [
        {
            "config": "c",
            "seed": s,
            "final_accuracy": f,
            "best_accuracy": 0.95,
            "steps_run": 10,
            "perturbations": 100,
            "wall_s": 1.0,
            "cpu_s": 1.0,
        }
        for s, f in enumerate([0.9, 0.3, 0.6])
    ]
    (row,) = summarise(runs)
    assert row["seeds"] == 3 and abs(row["final acc mean"] - 0.6) < 1e-12 and row["final acc min"] == 0.3
    assert abs(row["final acc sd"] - 0.3) < 1e-12 and row["best seen (mean)"] == 0.95


def test_memory_states_fwdllm_as_a_share_of_backprop_per_model_length_and_objective():
    from bench.memory import paper_comparison

    def group(model, seq, objective, peaks):
        return [{"model": model, "seq": seq, "objective": objective, "kind": k, "peak_rss_mb": v} for k, v in peaks]

    rows = group(
        "minilm",
        64,
        "classes",
        [("plain", 200.0), ("fwdllm", 210.0), ("fwdllm", 300.0), ("backprop", 600.0), ("backprop", 1000.0)],
    )
    rows.append({"model": "minilm", "seq": 128, "objective": "classes", "kind": "backprop", "peak_rss_mb": "error: x"})
    # one model, two objectives: each fwdllm row is set against backprop on its own objective only
    rows += group("smollm2", 64, "next tokens", [("fwdllm", 1190.0), ("backprop", 2000.0)])
    rows += group("smollm2", 64, "label words", [("fwdllm", 300.0), ("backprop", 1500.0)])
    assert paper_comparison(rows) == [
        "minilm seq 64 (classes): fwdllm at 21–50% of backprop's peak",
        "smollm2 seq 64 (next tokens): fwdllm at 60–60% of backprop's peak",
        "smollm2 seq 64 (label words): fwdllm at 20–20% of backprop's peak",
    ]


def test_memory_says_where_fwdllm_tops_the_papers_range_and_how_much_is_plain_inference():
    from bench.memory import above_paper

    def case(model, plain, fwd, backprop):
        return [
            {"model": model, "seq": 64, "objective": "classes", "kind": k, "configuration": c, "peak_rss_mb": v}
            for k, c, v in [
                ("plain", "one forward", plain),
                ("fwdllm", "ort", fwd),
                ("fwdllm", "litert", fwd + 10),
                ("backprop", "lora", backprop),
                ("backprop", "full", 2 * backprop),
            ]
        ]

    rows = case("minilm", 200.0, 210.0, 700.0) + case("smollm2", 1160.0, 1190.0, 2000.0)
    assert above_paper(rows) == [
        "smollm2 seq 64 (classes): litert at 60%, +40 MiB over plain inference, which alone is at 58%"
    ]


def test_recipe_reads_variance_control_and_sampler_on_against_off_off_the_table():
    from bench.recipe import on_off

    def row(name, mean, sd, perturbations):
        return {
            "configuration": name,
            "seeds": 3,
            "final acc mean": mean,
            "final acc sd": sd,
            "perturbations": perturbations,
        }

    rows = [
        row("head sgd lr 2", 0.89, 0.01, 20000),
        row("head sgd lr 2 + variance control", 0.92, 0.005, 44000),
        row("head sgd lr 2 + sampler", 0.885, 0.02, 20000),
    ]
    said = on_off(rows)
    assert "variance control: 0.920 ± 0.005 with it, 0.890 ± 0.010 without (3 and 3 seeds, +0.030), at 2.20×" in said
    assert (
        "the discriminative sampler: 0.885 ± 0.020 with it, 0.890 ± 0.010 without (3 and 3 seeds, -0.005), at 1.00×"
        in said
    )
    assert on_off(rows[:1]) == ""
