"""A `fwdllm simulate` run folder run by Flower's Simulation Engine: virtual nodes as ClientApps on Ray.

The run folder, partition and coordinator settings are `fwdllm simulate`'s (simulate.py), so the
report, plot and θ come out the same way; only the devices differ: one Flower virtual node per client
(its ``partition-id`` names its client file), scheduled by Ray on a local instance or on an existing
cluster (``ray_address``), ``client_cpus`` CPUs per running ClientApp. This calls the Simulation Runtime
that `flwr run` starts for a simulation federation (``flwr-simulation``), in this process, with the apps
as objects: no app package to build or install.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fwdllm.simulate import Simulation


def run_engine(sim: Simulation) -> None:
    """Run ``sim``'s job to its end (or resume it) on Ray; the coordinator state lands in ``sim.state``."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from flwr.app import Context, RecordDict
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    from fwdllm.flower.client_app import app as client_app
    from fwdllm.flower.server_app import app as server_app

    cfg = sim.cfg
    config_file = sim.out / "coordinator.json"
    config_file.write_text(json.dumps(cfg.coordinator_config(sim.data / "heldout.jsonl"), indent=1) + "\n")
    run_config = {
        "bundle": cfg.bundle,
        "state": str(sim.state),
        "config": str(config_file),
        "partition": str(sim.data.resolve()),
        "backend": cfg.backend,
        "nodes": cfg.clients,
    }
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    init_args = {"address": cfg.ray_address} if cfg.ray_address else {}
    backend_config = {"client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": 0.0}, "init_args": init_args}
    _run_simulation(
        num_supernodes=cfg.clients,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        client_app=client_app,
        server_app=server_app,
        backend_name="ray",
        backend_config=backend_config,
        server_app_context=context,
    )
