"""The in-process simulator: the real Coordinator and the device's own work, ending where `fwdllm simulate` ends."""

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fwdllm.cli import main
from fwdllm.proto.manifest import load_manifest, load_theta
from fwdllm.proto.perturbation import Distribution, generate
from fwdllm.simulate import SimConfig, simulate
from fwdllm.simulate_inprocess import run

BBC_LABELS = "business,entertainment,politics,sports,tech"


@pytest.fixture(scope="session")
def tiny_bitfit_bundle(tmp_path_factory):
    from export_helpers import tiny_checkpoint

    root = tmp_path_factory.mktemp("harness-tiny")
    out = root / "bundle"
    assert (
        main(
            [
                "export",
                "--model",
                str(tiny_checkpoint("bert", root / "ckpt")),
                "--task",
                "seq-cls",
                "--label-names",
                BBC_LABELS,
                "--peft",
                "bitfit",
                "--format",
                "onnx",
                "--seq-len",
                "16",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


def test_inprocess_steps_match_a_direct_update(tiny_bitfit_bundle):
    sim = SimConfig(
        bundle=str(tiny_bitfit_bundle),
        data="bbc",
        clients=5,
        per_step=3,
        steps=3,
        perturbations=4,
        lr=0.05,
        alpha=0.5,
        eval_every=2,
        eval_limit=24,
    )
    result = run(sim, progress=False, keep_submissions=True)

    assert [r["step"] for r in result.rows] == [0, 1, 2]
    assert all(r["perturbations"] == 12 and r["clients_answered"] == 3 for r in result.rows)
    assert all(r["device_seconds"] > 0 and r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in result.rows)
    evals = result.evals()
    assert [r["step"] for r in evals] == [1, 2]  # every 2 steps, and after the last
    assert all(0 <= r["test_accuracy"] <= 1 and np.isfinite(r["test_loss"]) for r in evals)
    assert result.before["eval_examples"] == 24 and "accuracy" in result.final

    # θ_{t+1} = θ_t − lr·(1 − t/T)·mean_i jvp_i·v(seed_i), recomputed from the devices' submissions, each
    # jvp bounded at 5 × the median over the step's submissions of their median |jvp| (aggregation.outlier).
    bundle = Path(sim.bundle)
    manifest = load_manifest(bundle)
    theta = load_theta(bundle, manifest).astype(np.float64)
    for step in range(sim.steps):
        submitted = [(seeds, jvp) for t, seeds, jvp in result.submissions if t == step]
        bound = 5.0 * np.median([np.median(np.abs(jvp)) for _, jvp in submitted])
        pairs = [(s, np.clip(j, -bound, bound)) for seeds, jvp in submitted for s, j in zip(seeds, jvp)]
        assert len(pairs) == 12
        grad = sum(float(j) * generate(s, 0, theta.size, Distribution.GAUSSIAN).astype(np.float64) for s, j in pairs)
        theta -= sim.lr * (1 - step / sim.steps) * grad / len(pairs)
    assert np.abs(theta).max() > 0
    np.testing.assert_allclose(result.theta, theta, rtol=1e-4, atol=1e-6)
    assert not np.allclose(result.theta, load_theta(bundle, manifest))


def test_inprocess_theta_equals_fwdllm_simulates(tiny_bitfit_bundle, tmp_path):
    """The same settings through real processes over loopback gRPC end on the same θ, bit for bit: those
    devices rebuild θ by replaying the update history, the in-process ones download it, and the coordinator
    computes θ with the rule devices replay."""
    sim = SimConfig(
        bundle=str(tiny_bitfit_bundle),
        data="bbc",
        clients=4,
        per_step=2,
        steps=3,
        workers=1,
        perturbations=3,
        lr=0.05,
        eval_every=3,
        eval_limit=8,
    )
    inprocess = run(sim, progress=False)
    simulate(sim, tmp_path / "sim", progress=False)
    layout = load_manifest(Path(sim.bundle)).theta
    through_processes = layout.flatten(load_file(str(tmp_path / "sim" / "theta.safetensors")))
    assert not np.array_equal(inprocess.theta, load_theta(Path(sim.bundle), load_manifest(Path(sim.bundle))))
    np.testing.assert_array_equal(inprocess.theta, through_processes)
