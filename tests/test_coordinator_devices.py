"""A real coordinator on loopback with real device clients (ONNX Runtime on the stand-in bundle) completes steps."""

from __future__ import annotations

import json
import threading

import numpy as np
from device_standin import TEXTS, shared_bundle, write_jsonl

from fwdllm.coordinator.config import from_dict
from fwdllm.coordinator.evaluation import BackendEvaluator
from fwdllm.coordinator.rounds import Coordinator
from fwdllm.coordinator.server import start
from fwdllm.device_runtime.backend import open_backend
from fwdllm.device_runtime.client import ClientConfig, DeviceClient
from fwdllm.proto.manifest import load_manifest, load_theta
from fwdllm.proto.perturbation import generate


def test_real_devices_complete_steps_with_evaluation(tmp_path):
    bundle = shared_bundle()[0]
    rows = [{"text": t, "label": lab} for t, lab in TEXTS]
    heldout = write_jsonl(tmp_path / "heldout.jsonl", rows)
    config = from_dict(
        {
            "run": {
                "steps": 3,
                "clients_per_step": 3,
                "perturbations_per_client": 2,
                "min_clients": 3,
                "over_select": 0.0,
                "batch_size": 4,
                "deadline_s": 60,
            },
            "optimizer": {"name": "sgd", "lr": 0.5, "schedule": "linear"},
            "aggregation": {"threads": 1},
            "server": {"heartbeat_ms": 200},
            "eval": {"every": 1, "data": str(heldout)},
        }
    )
    evaluator = BackendEvaluator(bundle, heldout, "onnxruntime", batch_size=4)
    coordinator = Coordinator(bundle, tmp_path / "state", config, evaluator=evaluator)
    coordinator.store.add_token("tok")
    server = start(coordinator, "127.0.0.1", 0)
    clients, threads, codes = [], [], []
    try:
        for i in range(3):
            data = write_jsonl(tmp_path / f"client-{i}.jsonl", rows[i:] + rows[:i])
            cfg = ClientConfig(
                coordinator=f"127.0.0.1:{server.port}",
                bundle=bundle,
                data=data,
                token="tok",
                name=f"dev{i}",
                backoff_s=(0.05, 0.4),
                rpc_timeout_s=10,
            )
            client = DeviceClient(cfg, backend=open_backend(bundle, "onnxruntime", options={"threads": 1}))
            clients.append(client)
            threads.append(threading.Thread(target=lambda c=client: codes.append(c.run()), daemon=True))
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert codes == [0, 0, 0] and coordinator.meta("finished")
        metrics = [json.loads(line) for line in (tmp_path / "state" / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [-1, 0, 1, 2]  # -1: the bundle's theta, before training
        assert all(m["perturbations"] == 6 and m["clients_answered"] == 3 for m in metrics[1:])
        assert all(0.0 <= m["accuracy"] <= 1.0 and np.isfinite(m["eval_loss"]) for m in metrics)
        assert all(np.isfinite(m["loss"]) for m in metrics[1:])
        assert metrics[0]["accuracy"] == evaluator(load_theta(bundle, load_manifest(bundle)))["accuracy"]
        # Theta equals the initial theta minus the recorded updates, summed densely here.
        manifest = load_manifest(bundle)
        theta = load_theta(bundle, manifest).astype(np.float64)
        for _version, lr, seeds, coeffs in coordinator.store.query("SELECT * FROM history ORDER BY version"):
            seeds, coeffs = np.frombuffer(seeds, "<u8"), np.frombuffer(coeffs, "<f4")
            v = np.stack([generate(int(s), 0, manifest.theta.dim) for s in seeds]).astype(np.float64)
            theta -= lr * (coeffs.astype(np.float64) @ v)
        np.testing.assert_allclose(coordinator.theta, theta, atol=1e-5)
        assert not np.allclose(coordinator.theta, load_theta(bundle, manifest))
    finally:
        for c in clients:
            c.stop()
        server.stop(0)
