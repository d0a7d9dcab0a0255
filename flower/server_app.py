"""The ServerApp: fwdllm's coordinator core, unchanged, driven through Flower's Grid.

Flower pushes messages to nodes where fwdllm's devices pull tasks, so the ServerApp pulls on each
idle node's behalf (in join order: selection and seeds then depend on the run's seeds alone, as in
`fwdllm simulate`) and pushes whatever task the core hands out as a train message. Everything the
gRPC coordinator decides, the core decides here too: client selection, seeds, waves and variance
control, the sampler, deadlines and over-selection, aggregation from seeds, the optimiser,
evaluation, checkpoints and metrics (``STATE/metrics.jsonl``). θ reaches a node only when its task
names a version the node does not hold: as the update history when that is replayable and smaller
than θ, else as θ itself; both counted in ``bytes_down`` as the gRPC coordinator counts them.

A node that Flower still lists is beaten for (the core's liveness rule); one that dies stops being
listed, its task expires after ``server.silent_after_beats`` heartbeat intervals or at the wave's
deadline, and its slot goes to the next idle node (or over-selection makes it unnecessary).

Run config (``flwr run --run-config``, or ``fwdllm simulate --engine flower``): ``bundle`` and
``state`` (folders), ``config`` (coordinator TOML/JSON, optional), ``partition`` (the client files of
nodes whose node config gives only ``partition-id``), ``backend``, ``nodes`` (wait for this many
before the first wave; default ``run.min_clients``), ``wait-s``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fwdllm.coordinator.config import from_dict, load_config
from fwdllm.coordinator.evaluation import evaluator_from_config
from fwdllm.coordinator.messages import Reject
from fwdllm.device_runtime.backend import DEFAULT_BACKEND
from fwdllm.device_runtime.client import ClientConfig
from fwdllm.errors import UserError
from fwdllm.flower.records import (
    HISTORY,
    NODE,
    RESULT,
    TASK,
    THETA,
    history_record,
    result_from_record,
    task_records,
    theta_record,
)
from fwdllm.proto.manifest import load_manifest, save_theta
from fwdllm.proto.v1 import fwdllm_pb2 as pb
from fwdllm.simulate_inprocess import merge
from fwdllm.simulate_link import Assignment, LocalCoordinator, Session

log = logging.getLogger("fwdllm.flower")

app = ServerApp()

#: The ServerApp calls the core on its nodes' behalf: a device's request rate limit means nothing here.
SERVER_SIDE = {"server": {"rate_per_s": 1e9, "rate_burst": 1 << 30}}
POLL_S = (0.02, 1.0)  # between polls for replies: doubling from the first to the second while nothing happens


@dataclass
class Job:
    """The run config the ServerApp reads."""

    bundle: str
    state: str
    config: str = ""
    partition: str = ""
    backend: str = DEFAULT_BACKEND
    nodes: int = 0
    wait_s: float = 600.0

    @classmethod
    def from_run_config(cls, run_config: dict) -> Job:
        names = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(run_config) - set(names))
        if unknown:
            raise UserError(f"unknown run config keys {unknown}; known: {sorted(names)}")
        missing = [n for n in ("bundle", "state") if not run_config.get(n)]
        if missing:
            raise UserError(
                f"the run config needs {' and '.join(missing)} (e.g. --run-config \"bundle='B' state='S'\")"
            )
        values = {names[k].name: v for k, v in run_config.items()}
        return cls(**values)


@dataclass
class Node:
    """A Flower node as the core knows it: its session and the message it is working on."""

    node_id: int
    session: Session
    pending: str = ""  # message id of its outstanding task


@dataclass
class Pending:
    node: Node
    assignment: Assignment


@dataclass
class FlowerCoordinator:
    grid: Grid
    job: Job
    nodes: dict[int, Node] = field(default_factory=dict)  # in join order
    refused: set[int] = field(default_factory=set)  # nodes that did not answer the query or hold another model
    pending: dict[str, Pending] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bundle = Path(self.job.bundle)
        config = merge(load_config(self.job.config or None).to_json(), SERVER_SIDE)
        evaluator = evaluator_from_config(from_dict(config).eval, bundle)
        self.link = LocalCoordinator(bundle, Path(self.job.state), config, evaluator)
        self.shared = {"bundle": str(bundle.resolve()), "partition": self.job.partition, "backend": self.job.backend}
        server = self.link.cfg.server
        self.retry_s, self.beat_s = server.retry_ms / 1000, server.heartbeat_ms / 2000
        self.ttl = self.link.cfg.run.deadline_s * 2 + 60

    # ----- nodes -----
    def wait_for_nodes(self) -> None:
        want = self.job.nodes or self.link.cfg.run.min_clients
        give_up = time.monotonic() + self.job.wait_s
        while (have := len(list(self.grid.get_node_ids()))) < want:
            if time.monotonic() > give_up:
                raise UserError(f"only {have} of {want} Flower nodes connected within {self.job.wait_s:.0f} s")
            time.sleep(1.0)

    def join(self, node_ids: list[int]) -> None:
        """Ask the nodes what they hold and enrol them with the core, ordered by partition id then node id."""
        queries = [
            Message(RecordDict({TASK: ConfigRecord(self.shared)}), dst_node_id=n, message_type=MessageType.QUERY)
            for n in node_ids
        ]
        answered = []
        for reply in self.grid.send_and_receive(queries, timeout=self.job.wait_s):
            node_id = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("node %d cannot serve this run: %s", node_id, reply.error.reason)
                continue
            info = reply.content.config_records[NODE]
            if info["fingerprint"] != self.link.fingerprint:
                log.warning("node %d holds another model (fingerprint %s)", node_id, info["fingerprint"])
                continue
            answered.append((int(info["partition_id"]), node_id, info))
        for _, node_id, info in sorted(answered, key=lambda a: a[:2]):
            caps = pb.Capabilities.FromString(info["capabilities"])
            session = self.link.enrol(f"flower-node-{node_id}", int(info["num_examples"]), caps)
            self.nodes[node_id] = Node(node_id, session)
        self.refused |= set(node_ids) - self.nodes.keys()

    # ----- tasks -----
    def task_message(self, node: Node, task: Assignment) -> Message:
        """The task, with θ or its history when the node holds another version."""
        s = node.session
        config = task_records(
            task.work,
            task.message.task_id,
            task.step,
            task.theta_version,
            self.link.fingerprint,
            s.theta_version,
            self.shared,
        )
        content = RecordDict({TASK: config})
        if s.theta_version != task.theta_version:
            history = (
                self.link.history_for(s, task.theta_version, ClientConfig.replay_max_seeds) if s.theta_version else None
            )
            if history is not None:
                content[HISTORY] = history_record(history)
            else:
                content[THETA] = theta_record(self.link.theta_for(s, task.theta_version))
            s.theta, s.theta_version = None, task.theta_version  # the server keeps no copy per node
        return Message(content, dst_node_id=node.node_id, message_type=MessageType.TRAIN, ttl=self.ttl)

    def hand_out(self, online: set[int]) -> None:
        """Pull for every idle online node in join order and push the tasks the core hands out."""
        out = []
        for node in self.nodes.values():
            if node.pending or node.node_id not in online:
                continue
            task = self.link.pull(node.session)
            if task is not None:
                out.append((node, task, self.task_message(node, task)))
        if not out:
            return
        for (node, task, _), message_id in zip(out, self.grid.push_messages([m for _, _, m in out])):
            node.pending = message_id
            self.pending[message_id] = Pending(node, task)

    def collect(self) -> bool:
        """Submit every reply that arrived; True when one did."""
        if not self.pending:
            return False
        replies = list(self.grid.pull_messages(list(self.pending)))
        for reply in replies:
            waiting = self.pending.pop(reply.metadata.reply_to_message_id, None)
            if waiting is None:
                continue
            node = waiting.node
            node.pending = ""
            if reply.has_error():
                log.warning("node %d failed its task: %s", node.node_id, reply.error.reason)
                node.session.theta_version = 0  # its θ is unknown now: the next task carries θ
                continue
            try:
                self.link.submit(
                    node.session, waiting.assignment, result_from_record(reply.content.metric_records[RESULT])
                )
            except Reject as exc:
                log.info("node %d's result was refused (%s): %s", node.node_id, exc.counter, exc.message)
        return bool(replies)

    def beat(self, online: set[int]) -> None:
        for node in self.nodes.values():
            if node.pending and node.node_id in online:
                self.link.beat(node.session)

    # ----- the run -----
    def run(self) -> None:
        self.wait_for_nodes()
        self.join(sorted(self.grid.get_node_ids()))
        if not self.nodes:
            raise UserError("no Flower node can serve this run (see the warnings above)")
        last_pass = last_beat = 0.0
        changed, idle = True, 0
        while not self.link.finished:
            self.link.tick()
            now = time.monotonic()
            if changed or now - last_pass >= self.retry_s:
                online = set(self.grid.get_node_ids())
                newcomers = sorted(online - self.nodes.keys() - self.refused)
                if newcomers:
                    self.join(newcomers)
                self.hand_out(online)
                last_pass = now
            if now - last_beat >= self.beat_s:
                self.beat(online)
                last_beat = now
            changed = self.collect()
            idle = 0 if changed else idle + 1
            if idle:
                time.sleep(min(POLL_S[1], POLL_S[0] * 2 ** (idle - 1)))
        save_theta(
            Path(self.job.state) / "theta.safetensors", load_manifest(Path(self.job.bundle)).theta, self.link.theta()
        )
        log.info("run finished at step %d", self.link.step)

    def close(self) -> None:
        self.link.close()


@app.main()
def main(grid: Grid, context: Context) -> None:
    coordinator = FlowerCoordinator(grid, Job.from_run_config(dict(context.run_config)))
    try:
        coordinator.run()
    finally:
        coordinator.close()
