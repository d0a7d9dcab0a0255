"""fwdllm on Flower's Simulation Engine: the same θ as fwdllm's own simulation, and 100 virtual clients learning.

Real Flower (the Simulation Runtime on a local Ray instance), real bundles, BBC News partitions.
"""

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fwdllm.cli import main
from fwdllm.proto.manifest import load_manifest, load_theta
from fwdllm.proto.names import VarianceMode
from fwdllm.simulate import SimConfig, simulate
from fwdllm.simulate_inprocess import run

pytest.importorskip("flwr")
pytest.importorskip("ray")

BBC_LABELS = "business,entertainment,politics,sports,tech"


def export_head(out: Path, model) -> Path:
    args = ["export", "--model", str(model), "--task", "seq-cls", "--label-names", BBC_LABELS, "--peft", "head"]
    assert main([*args, "--trainable-layers", "head", "--format", "onnx", "--seq-len", "32", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_head(tmp_path_factory):
    from export_helpers import tiny_checkpoint

    root = tmp_path_factory.mktemp("flower-tiny")
    return export_head(root / "bundle", tiny_checkpoint("bert", root / "ckpt"))


@pytest.fixture(scope="session")
def minilm_head(tmp_path_factory):
    return export_head(tmp_path_factory.mktemp("flower-minilm") / "bundle", "minilm")


def _theta(run_dir: Path, bundle: Path) -> np.ndarray:
    return load_manifest(bundle).theta.flatten(load_file(str(run_dir / "theta.safetensors")))


def _rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "state" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["step"] >= 0]


@pytest.mark.parametrize(
    "settings",
    [
        # plain SGD: nodes rebuild θ from the update history; variance control adds waves; the sampler picks seeds
        {"variance": VarianceMode.RELATIVE, "max_waves": 2, "sampler": True},
        # Adam is not replayable: nodes receive θ itself
        {"optimizer": "adam", "lr": 0.01},
    ],
    ids=["sgd-waves-sampler", "adam"],
)
def test_flower_ends_on_the_theta_of_the_inprocess_simulation(tiny_head, tmp_path, settings):
    base = {"lr": 0.05, **settings}
    cfg = SimConfig(
        bundle=str(tiny_head),
        data="bbc",
        clients=4,
        per_step=2,
        steps=3,
        perturbations=3,
        eval_every=3,
        eval_limit=8,
        engine="flower",
        **base,
    )
    summary = simulate(cfg, tmp_path / "flower", progress=False)
    reference = run(
        SimConfig(
            bundle=str(tiny_head),
            data="bbc",
            clients=4,
            per_step=2,
            steps=3,
            perturbations=3,
            eval_every=3,
            eval_limit=8,
            **base,
        ),
        progress=False,
    )

    assert summary["steps"] == 3
    theta = _theta(tmp_path / "flower", tiny_head)
    assert not np.array_equal(theta, load_theta(tiny_head, load_manifest(tiny_head)))
    # within float32 rounding of θ's magnitude (here: bit for bit, both apply the update rule in one order)
    np.testing.assert_allclose(theta, reference.theta, rtol=0, atol=4 * np.finfo(np.float32).eps * np.abs(theta).max())
    flower_rows = _rows(tmp_path / "flower")
    assert [r["waves"] for r in flower_rows] == [r["waves"] for r in reference.rows]
    assert [r["perturbations"] for r in flower_rows] == [r["perturbations"] for r in reference.rows]
    down_flower, down_ref = sum(r["bytes_down"] for r in flower_rows), sum(r["bytes_down"] for r in reference.rows)
    if "optimizer" in settings:
        assert down_flower >= down_ref  # θ itself every step, after a refused history request (as over gRPC)
    else:
        assert down_flower < down_ref  # history replay instead of θ after the first step


def test_a_hundred_virtual_clients_learn(minilm_head, tmp_path):
    from fwdllm.coordinator.evaluation import BackendEvaluator

    cfg = SimConfig(
        bundle=str(minilm_head),
        data="bbc",
        clients=100,
        per_step=10,
        steps=5,
        perturbations=20,
        lr=0.5,
        alpha=None,
        eval_every=5,
        eval_limit=80,
        engine="flower",
    )
    summary = simulate(cfg, tmp_path / "run", progress=False)
    assert summary["steps"] == 5 and summary["perturbations"] == 5 * 10 * 20
    rows = _rows(tmp_path / "run")
    assert all(r["clients_answered"] == 10 for r in rows)
    with sqlite3.connect(tmp_path / "run" / "state" / "coordinator.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM clients").fetchone()[0] == 100  # every virtual node joined
        answered = db.execute("SELECT COUNT(DISTINCT client_id) FROM tasks WHERE status = 'accepted'").fetchone()[0]
    assert answered > 10  # selection spread the steps over the nodes
    # the final θ, evaluated apart from the run, is better than the bundle's
    evaluate = BackendEvaluator(minilm_head, tmp_path / "run" / "data" / "heldout.jsonl", limit=80)
    before = evaluate(load_theta(minilm_head, load_manifest(minilm_head)))
    after = evaluate(_theta(tmp_path / "run", minilm_head))
    assert after["accuracy"] == pytest.approx(summary["after"]["accuracy"])
    assert after["accuracy"] > before["accuracy"] + 0.1 and after["eval_loss"] < before["eval_loss"] - 0.1
