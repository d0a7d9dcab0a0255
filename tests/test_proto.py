"""The wire contract: committed stubs are current, and a real server on loopback answers a real client."""

import json
import subprocess
import sys
from concurrent import futures

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fwdllm.proto.names import DifferenceScheme, Distribution, Task
from fwdllm.proto.v1 import fwdllm_pb2 as pb
from fwdllm.proto.v1 import fwdllm_pb2_grpc as pb_grpc


def test_committed_stubs_equal_a_fresh_generation():
    proc = subprocess.run([sys.executable, "-m", "fwdllm.proto.generate", "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


class EchoServicer(pb_grpc.FwdLLMServicer):
    """Answers from what it was sent, so the test can check every field crossed the wire."""

    def __init__(self):
        self.submitted = []

    def Join(self, request, context):
        if request.protocol_version != pb.PROTOCOL_VERSION_1:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "protocol version")
        return pb.JoinResponse(
            client_id="c-" + request.client_name,
            session_token="tok",
            protocol_version=pb.PROTOCOL_VERSION_1,
            model_fingerprint=request.model_fingerprint,
            theta_dim=10,
            theta_version=3,
        )

    def PullTask(self, request, context):
        return pb.PullTaskResponse(
            task=pb.Task(
                task_id="t1",
                step=4,
                wave=1,
                theta_version=request.theta_version,
                seeds=[2**64 - 1],
                seed_ranges=[pb.SeedRange(start=4 << 32, count=8)],
                distribution=pb.GAUSSIAN,
                epsilon=0.01,
                scheme=pb.CENTRAL,
                batch=pb.BatchRef(start=16, size=8),
                deadline_unix_ms=123,
            )
        )

    def Submit(self, request, context):
        self.submitted.append(request)
        return pb.SubmitResponse(accepted=True, message=f"{len(request.jvp)} values")

    def FetchParameters(self, request, context):
        theta = np.arange(10, dtype="<f4")
        for offset in range(0, 10, 4):
            yield pb.ParameterChunk(version=3, offset=offset, total=10, values=theta[offset : offset + 4].tobytes())


@pytest.fixture()
def server():
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = EchoServicer()
    pb_grpc.add_FwdLLMServicer_to_server(servicer, srv)
    health_servicer = health.HealthServicer()
    health_servicer.set("fwdllm.v1.FwdLLM", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield servicer, f"127.0.0.1:{port}"
    srv.stop(None)


def test_round_trip_over_loopback(server):
    servicer, address = server
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.FwdLLMStub(channel)
        joined = stub.Join(
            pb.JoinRequest(
                protocol_version=pb.PROTOCOL_VERSION_1,
                client_name="pixel",
                model_fingerprint="abc",
                capabilities=pb.Capabilities(
                    backend="litert", delegates=["XNNPACK"], abi="arm64-v8a", versions={"fwdllm": "0.1.0"}
                ),
            )
        )
        assert (joined.client_id, joined.model_fingerprint, joined.theta_dim) == ("c-pixel", "abc", 10)

        task = stub.PullTask(pb.PullTaskRequest(client_id=joined.client_id, theta_version=3)).task
        assert task.seeds == [2**64 - 1] and task.seed_ranges[0].start == 4 << 32 and task.seed_ranges[0].count == 8
        assert task.scheme == pb.CENTRAL and task.distribution == pb.GAUSSIAN
        assert abs(task.epsilon - 0.01) < 1e-9 and task.batch.size == 8

        jvp = [0.5, -1.25, float(np.float32(3.3))]
        reply = stub.Submit(
            pb.SubmitRequest(
                client_id=joined.client_id,
                task_id=task.task_id,
                seeds=[1, 2, 3],
                jvp=jvp,
                nonfinite=[1],
                loss=pb.LossStats(mean=1.5),
            )
        )
        assert reply.accepted and reply.message == "3 values"
        got = servicer.submitted[0]
        assert list(got.jvp) == jvp and list(got.seeds) == [1, 2, 3] and list(got.nonfinite) == [1]

        chunks = list(stub.FetchParameters(pb.FetchParametersRequest(version=3)))
        theta = np.concatenate([np.frombuffer(c.values, dtype="<f4") for c in chunks])
        np.testing.assert_array_equal(theta, np.arange(10, dtype=np.float32))

        with pytest.raises(grpc.RpcError) as err:
            stub.Join(pb.JoinRequest(protocol_version=pb.PROTOCOL_VERSION_UNSPECIFIED))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

        with pytest.raises(grpc.RpcError) as err:
            stub.Heartbeat(pb.HeartbeatRequest())
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_health_service(server):
    _, address = server
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="fwdllm.v1.FwdLLM"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("names", [Distribution, DifferenceScheme])
def test_shared_names_map_to_the_protocol_enums_both_ways(names):
    proto_enum = getattr(pb, names.__name__)
    assert {proto_enum.Name(m.wire) for m in names} == {m.name for m in names}
    assert [names.from_wire(m.wire) for m in names] == list(names)
    assert names.from_wire(0) == list(names)[0]  # UNSPECIFIED reads as the protocol's default
    with pytest.raises(ValueError, match=f"{names.__name__} 99 is not one of"):
        names.from_wire(99)


def test_a_device_refuses_a_distribution_it_does_not_know():
    """A spec-v2 task reaches the engine as its distribution; a later version's number is refused, never guessed."""
    from fwdllm.device_runtime.engine import EngineError
    from fwdllm.device_runtime.messages import task_from_pb

    task = pb.Task(seeds=[1], distribution=pb.SPARSE_GAUSSIAN_0_1, batch=pb.BatchRef(size=8))
    assert task_from_pb(task).distribution == Distribution.SPARSE_GAUSSIAN_0_1
    task.distribution = 5
    with pytest.raises(EngineError, match=r"cannot be computed here: Distribution 5 is not one of \[1, 2, 3, 4\]"):
        task_from_pb(task)


def test_shared_names_are_their_plain_strings():
    assert Distribution.GAUSSIAN == "gaussian" and f"{Task.CAUSAL_LM}" == "causal-lm"
    assert json.dumps([DifferenceScheme.FORWARD]) == '["forward"]'
