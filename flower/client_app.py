"""The ClientApp: a Flower node computes fwdllm tasks with the device's own ``do_task`` on its bundle and data.

What a node holds comes from its node config, and what the node config leaves out from the job the
ServerApp sends along with each message (the simulation's shared bundle and partition folder):

- ``bundle``: the bundle folder (any backend's graphs: onnxruntime, litert, llama.cpp);
- ``data``: its JSONL examples, or ``partition-id`` (which Flower's simulation sets) to read
  ``client-NNNNN.jsonl`` of the job's partition folder;
- ``backend``: the backend name (default: the job's).

The opened backend is cached per process (a simulation actor serves many virtual nodes with one),
the examples per node; θ lives in the node's context state between messages, so a node that already
holds the task's θ version receives neither θ nor history.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fwdllm.device_runtime.backend import Backend, open_backend
from fwdllm.device_runtime.client import capabilities
from fwdllm.device_runtime.examples import load_examples
from fwdllm.device_runtime.work import LocalData, do_task
from fwdllm.errors import UserError
from fwdllm.flower.records import HISTORY, NODE, TASK, THETA, reply_content, task_from_records, theta_record
from fwdllm.proto.manifest import Manifest, load_manifest
from fwdllm.proto.names import Distribution
from fwdllm.proto.update_rule import apply_update
from fwdllm.proto.v1 import fwdllm_pb2 as pb

app = ClientApp()

_BACKENDS: dict[tuple[str, str], tuple[Backend, Manifest]] = {}
_DATA: dict[str, LocalData] = {}


def node_files(node_config: dict, job: ConfigRecord) -> tuple[Path, Path, str]:
    """(bundle, data file, backend) of this node."""
    from fwdllm.data.partition import client_file

    bundle = Path(str(node_config.get("bundle") or job["bundle"]))
    backend = str(node_config.get("backend") or job["backend"])
    if node_config.get("data"):
        return bundle, Path(str(node_config["data"])), backend
    if "partition-id" not in node_config or not job.get("partition"):
        raise UserError("this node's config names neither data=FILE nor partition-id=N (with the job's partition)")
    return bundle, Path(str(job["partition"])) / client_file(int(node_config["partition-id"])), backend


def _open(bundle: Path, data: Path, backend_name: str) -> tuple[Backend, Manifest, LocalData]:
    key = (str(bundle.resolve()), backend_name)
    if key not in _BACKENDS:
        manifest = load_manifest(bundle)  # one thread per ClientApp: Ray's client resources say how many run at once
        _BACKENDS[key] = (open_backend(bundle, backend_name, options={"threads": 1}, manifest=manifest), manifest)
    backend, manifest = _BACKENDS[key]
    if str(data) not in _DATA:
        _DATA[str(data)] = LocalData(load_examples(data, manifest), backend.tokenizer())
    return backend, manifest, _DATA[str(data)]


@app.query()
def describe(msg: Message, context: Context) -> Message:
    """What the coordinator's Join needs: the node's example count, capabilities and partition."""
    bundle, data, backend_name = node_files(context.node_config, msg.content.config_records[TASK])
    backend, manifest, local = _open(bundle, data, backend_name)
    info = ConfigRecord(
        {
            "fingerprint": manifest.fingerprint(),
            "capabilities": capabilities(backend).SerializeToString(),
            "num_examples": len(local.examples),
            "partition_id": int(context.node_config.get("partition-id", -1)),
        }
    )
    return Message(RecordDict({NODE: info}), reply_to=msg)


def _theta(msg: Message, context: Context, version: int, base: int) -> np.ndarray:
    """θ of ``version``: sent whole, rebuilt from the node's θ and the sent history, or the one it holds."""
    content, state = msg.content, context.state
    if THETA in content.array_records:
        theta = content.array_records[THETA][THETA].numpy().astype(np.float32)
    else:
        held = int(state.config_records[NODE]["theta_version"]) if NODE in state.config_records else 0
        if held != base:
            raise UserError(f"this node holds θ version {held}, not {base}; send θ")
        theta = state.array_records[THETA][THETA].numpy().astype(np.float32)
        if HISTORY in content.config_records:
            history = pb.FetchHistoryResponse.FromString(content.config_records[HISTORY][HISTORY])
            for u in history.updates:
                theta = apply_update(theta, u.seeds, u.coefficients, u.lr, Distribution.from_wire(u.distribution))
    state.array_records[THETA] = theta_record(theta)
    state.config_records[NODE] = ConfigRecord({"theta_version": version})
    return theta


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One task: θ brought to the task's version, then the device's own work on this node's data."""
    job = msg.content.config_records[TASK]
    bundle, data, backend_name = node_files(context.node_config, job)
    backend, manifest, local = _open(bundle, data, backend_name)
    if manifest.fingerprint() != job["fingerprint"]:
        raise UserError(f"this node's bundle {bundle} is not the run's model (fingerprint {job['fingerprint']})")
    version = int(job["theta_version"])
    theta = _theta(msg, context, version, int(job["base_version"]))
    result = do_task(task_from_records(job), backend, local, theta)
    return Message(reply_content(result, version, str(job["task_id"])), reply_to=msg)
