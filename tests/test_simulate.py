"""`fwdllm simulate` end to end: a real coordinator process and device processes over loopback gRPC."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from export_helpers import export_head_bundle
from safetensors.numpy import load_file

from fwdllm.errors import UserError
from fwdllm.simulate import SimConfig, simulate


@pytest.fixture(scope="session")
def tiny_head_bundle(tmp_path_factory):
    from export_helpers import tiny_checkpoint

    root = tmp_path_factory.mktemp("sim-tiny")
    return export_head_bundle(root / "bundle", tiny_checkpoint("bert", root / "ckpt"))


def test_simulation_learns_through_real_processes(minilm_head_bundle, tmp_path):
    cfg = SimConfig(
        bundle=str(minilm_head_bundle),
        data="bbc",
        clients=6,
        per_step=3,
        steps=6,
        workers=2,
        perturbations=20,
        lr=0.5,
        alpha=None,
        eval_every=3,
        eval_limit=80,
    )
    s = simulate(cfg, tmp_path / "run", progress=False)
    assert s["steps"] == 6 and s["perturbations"] == 6 * 3 * 20
    assert s["after"]["eval_loss"] < s["before"]["eval_loss"] - 0.1
    assert s["after"]["accuracy"] > s["before"]["accuracy"] + 0.1
    rows = [json.loads(line) for line in (tmp_path / "run" / "state" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == -1 and rows[0]["accuracy"] == s["before"]["accuracy"]  # θ0, evaluated by the coordinator
    rows = rows[1:]
    assert all(r["clients_answered"] == 3 for r in rows)  # every step heard three distinct device clients
    assert s["bytes_up"] == sum(r["bytes_up"] for r in rows) > 0
    assert (tmp_path / "run" / "convergence.png").stat().st_size > 1000
    report = (tmp_path / "run" / "report.md").read_text()
    assert "held-out accuracy" in report and f"{s['after']['accuracy']:.3f}" in report
    theta = load_file(str(tmp_path / "run" / "theta.safetensors"))
    assert theta["classifier.weight"].shape == (5, 384) and np.abs(theta["classifier.weight"]).max() > 0


def _rows(run):
    """Applied steps so far (the step -1 row is the initial evaluation)."""
    path = run / "state" / "metrics.jsonl"
    return [line for line in path.read_text().splitlines() if '"step": -1' not in line] if path.exists() else []


def test_interrupted_run_resumes_to_the_same_theta(tiny_head_bundle, tmp_path):
    settings = dict(
        bundle=str(tiny_head_bundle),
        data="bbc",
        clients=6,
        per_step=3,
        steps=16,
        workers=2,
        perturbations=4,
        lr=0.05,
        alpha=0.5,
        eval_every=16,
        eval_limit=40,
    )
    whole = simulate(SimConfig(**settings), tmp_path / "whole", progress=False)

    run = tmp_path / "interrupted"
    cmd = [
        sys.executable,
        "-m",
        "fwdllm.cli",
        "simulate",
        "--out",
        str(run),
        "--bundle",
        settings["bundle"],
        "--data",
        "bbc",
        "--clients",
        "6",
        "--per-step",
        "3",
        "--steps",
        "16",
        "--workers",
        "2",
        "--perturbations",
        "4",
        "--lr",
        "0.05",
        "--alpha",
        "0.5",
        "--eval-every",
        "16",
        "--eval-limit",
        "40",
    ]
    # SIGINT back to its default in the child: a CI runner that starts us in the background hands down SIGINT
    # ignored, and Python then never turns Ctrl-C into KeyboardInterrupt (the run just finished, exit 0)
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 240
    while len(_rows(run)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err
    stopped_at = len(_rows(run))
    assert 3 <= stopped_at < 16

    resumed = simulate(None, run, resume=True, progress=False)
    assert resumed["steps"] == 16
    got = load_file(str(run / "theta.safetensors"))
    want = load_file(str(tmp_path / "whole" / "theta.safetensors"))
    assert np.abs(want["classifier.weight"]).max() > 1e-3  # θ moved away from its zero start
    scale = max(np.abs(v).max() for v in want.values())
    for name in want:  # equal up to float32 rounding: the coordinator sums a wave's results in task-id order
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=2e-5 * scale, err_msg=name)
    assert resumed["after"]["eval_loss"] == pytest.approx(whole["after"]["eval_loss"], rel=1e-4)


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_sigterm_stops_the_coordinator_and_workers_too(tiny_head_bundle, tmp_path):
    run = tmp_path / "terminated"
    cmd = [
        sys.executable,
        "-m",
        "fwdllm.cli",
        "simulate",
        "--out",
        str(run),
        "--bundle",
        str(tiny_head_bundle),
        "--data",
        "bbc",
        "--clients",
        "4",
        "--per-step",
        "2",
        "--steps",
        "200",
        "--workers",
        "2",
        "--perturbations",
        "2",
        "--eval-every",
        "200",
    ]
    # SIGINT back to its default in the child: a CI runner that starts us in the background hands down SIGINT
    # ignored, and Python then never turns Ctrl-C into KeyboardInterrupt (the run just finished, exit 0)
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 240
    while not _rows(run) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_mentioning(str(run)), "the coordinator and workers should be running"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    deadline = time.monotonic() + 30
    while _processes_mentioning(str(run)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_mentioning(str(run)) == []


def test_a_token_that_starts_with_a_dash_still_starts_the_processes(tiny_head_bundle, tmp_path, monkeypatch):
    import fwdllm.simulate as sim_module

    monkeypatch.setattr(sim_module.secrets, "token_hex", lambda n: "-looks-like-an-option")
    summary = simulate(
        SimConfig(
            bundle=str(tiny_head_bundle),
            data="bbc",
            clients=4,
            per_step=2,
            steps=2,
            workers=1,
            perturbations=2,
            eval_every=2,
            eval_limit=20,
        ),
        tmp_path / "dash",
        progress=False,
    )
    assert summary["steps"] == 2


def test_run_folder_mistakes_name_the_fix(tiny_head_bundle, tmp_path):
    with pytest.raises(UserError, match="no simulation to resume"):
        simulate(None, tmp_path / "none", resume=True)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "sim.json").write_text("{}")
    with pytest.raises(UserError, match="--resume"):
        simulate(SimConfig(bundle=str(tiny_head_bundle), data="bbc", clients=4, per_step=2), tmp_path / "taken")
    with pytest.raises(UserError, match="--per-step"):
        simulate(SimConfig(bundle=str(tiny_head_bundle), data="bbc", clients=4, per_step=5), tmp_path / "x")
    with pytest.raises(UserError, match="--backend"):
        simulate(SimConfig(bundle=str(tiny_head_bundle), data="bbc", backend="tensorrt"), tmp_path / "z")
    with pytest.raises(UserError, match="not a bundle"):
        simulate(SimConfig(bundle=str(tmp_path), data="bbc"), tmp_path / "y")
