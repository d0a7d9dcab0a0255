"""Shared pieces of the coordinator tests: a tiny bundle and a numpy device with a known loss.

The device computes jvp exactly as a real one would (central difference of its loss along
v(seed) regenerated from the task's seeds), for the quadratic loss 0.5 * |theta - target|^2
whose gradient theta - target is known, so a step can be checked against a dense sum.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import grpc
import numpy as np

from fwdllm.proto.manifest import Manifest, ModelInfo, PeftInfo, ThetaLayout, save_theta, write_manifest
from fwdllm.proto.names import Task
from fwdllm.proto.perturbation import generate
from fwdllm.proto.v1 import fwdllm_pb2 as pb
from fwdllm.proto.v1 import fwdllm_pb2_grpc as pb_grpc

LAYOUT = ThetaLayout.from_shapes(
    [("encoder.layer.0.bias", (40,)), ("classifier.weight", (3, 12)), ("classifier.bias", (3,))]
)


def make_bundle(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text("{}")
    save_theta(out / "theta.safetensors", LAYOUT, np.linspace(-1, 1, LAYOUT.dim, dtype=np.float32))
    manifest = Manifest(
        model=ModelInfo(
            source="test",
            architecture="quadratic",
            task=Task.SEQ_CLS,
            max_seq_len=8,
            tokenizer="tokenizer.json",
            num_labels=3,
        ),
        peft=PeftInfo(method="bitfit", trainable_layers="all"),
        theta=LAYOUT,
        graphs=[],
    )
    write_manifest(out, manifest)
    return out


def write_config(path: Path, sections: dict) -> Path:
    path.write_text(json.dumps(sections))
    return path


def task_seeds(task: pb.Task) -> list[int]:
    seeds = list(task.seeds)
    for r in task.seed_ranges:
        seeds.extend(range(r.start, r.start + r.count))
    return seeds


def peer_bounded(results: list[list[tuple[int, float]]], outlier: float = 5.0) -> list[tuple[int, float]]:
    """A step's (seed, jvp) pairs, results concatenated, with each jvp bounded as ``aggregation.outlier``
    says: at ``outlier`` × the median over the results of each one's median |jvp|, given 3 results or more."""
    pairs = [pair for result in results for pair in result]
    if len(results) < 3:
        return pairs
    bound = outlier * float(np.median([np.median([abs(j) for _, j in result]) for result in results]))
    return [(s, float(np.clip(j, -bound, bound))) for s, j in pairs]


def dense_v(seeds, dim=LAYOUT.dim, dist="gaussian") -> np.ndarray:
    return np.stack([generate(int(s), 0, dim, dist) for s in seeds]).astype(np.float64)


class QuadraticDevice:
    """A device speaking the real protocol over a real channel, with loss 0.5 * |theta - target|^2."""

    def __init__(self, channel: grpc.Channel, index: int):
        self.stub = pb_grpc.FwdLLMStub(channel)
        self.target = np.random.default_rng(100 + index).normal(size=LAYOUT.dim)
        self.index = index
        self.client_id = self.session = ""
        self.theta_version, self.theta = 0, None

    def join(self, token: str, fingerprint: str, previous: str = "") -> pb.JoinResponse:
        reply = self.stub.Join(
            pb.JoinRequest(
                protocol_version=pb.PROTOCOL_VERSION_1,
                enrolment_token=token,
                client_name=f"quad-{self.index}",
                model_fingerprint=fingerprint,
                num_examples=100,
                previous_client_id=previous,
                capabilities=pb.Capabilities(backend="numpy", cpu_count=1 + self.index),
            ),
            timeout=10,
        )
        self.client_id, self.session = reply.client_id, reply.session_token
        return reply

    def loss(self, theta: np.ndarray) -> float:
        return 0.5 * float(np.sum((theta - self.target) ** 2))

    def gradient(self, theta: np.ndarray) -> np.ndarray:
        return theta - self.target

    def fetch(self, version: int) -> np.ndarray:
        if version != self.theta_version:
            chunks = list(
                self.stub.FetchParameters(
                    pb.FetchParametersRequest(
                        client_id=self.client_id, session_token=self.session, version=version, chunk_values=17
                    ),
                    timeout=10,
                )
            )
            data = b"".join(c.values for c in chunks)
            assert hashlib.sha256(data).hexdigest() == chunks[-1].sha256
            self.theta, self.theta_version = np.frombuffer(data, "<f4").astype(np.float64), chunks[-1].version
        return self.theta

    def pull(self) -> pb.PullTaskResponse:
        return self.stub.PullTask(
            pb.PullTaskRequest(client_id=self.client_id, session_token=self.session, theta_version=self.theta_version),
            timeout=10,
        )

    def compute(self, task: pb.Task) -> np.ndarray:
        theta, eps = self.fetch(task.theta_version), task.epsilon
        jvp = []
        for v in dense_v(task_seeds(task)):
            jvp.append((self.loss(theta + eps * v) - self.loss(theta - eps * v)) / (2 * eps))
        return np.array(jvp, dtype=np.float32)

    def submit(self, task: pb.Task, jvp, nonfinite=(), **overrides) -> pb.SubmitResponse:
        fields = dict(
            client_id=self.client_id,
            session_token=self.session,
            task_id=task.task_id,
            step=task.step,
            seeds=task_seeds(task),
            jvp=list(jvp),
            nonfinite=list(nonfinite),
            loss=pb.LossStats(mean=self.loss(self.fetch(task.theta_version))),
            num_examples=8,
        )
        fields.update(overrides)
        return self.stub.Submit(pb.SubmitRequest(**fields), timeout=10)
