"""What idle streams cost a served coordinator: steps per 10 s with and without them, and the server's memory.

A real `fwdllm coordinator serve` process on loopback; three clients (grpc.aio, one process) join, pull
and submit as fast as the server lets them, for a fixed window, first alone and then while N streams of
each streaming method the server exposes (health Watch, reflection, FetchParameters) are held open and
idle from the same process over several connections. A thread pool server stopped at 32 such streams.

    python bench/idle_streams.py [--streams N] [--window S]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.aggregation import make_bundle  # noqa: E402
from bench.report import write_results  # noqa: E402
from fwdllm.proto.manifest import load_manifest  # noqa: E402

CLIENTS = 3
CONNECTIONS = 10


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def steps_in(port: int, fingerprint: str, window_s: float, idle_streams: int, pid: int) -> dict:
    """Steps the server completed in ``window_s`` seconds of three busy clients, ``idle_streams`` of each
    streaming method held open meanwhile; with the server's RSS once the streams are open."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2_grpc

    from fwdllm.proto.v1 import fwdllm_pb2 as pb
    from fwdllm.proto.v1 import fwdllm_pb2_grpc as pb_grpc

    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.FwdLLMStub(channel)
    sessions = []
    for i in range(CLIENTS):
        joined = await stub.Join(
            pb.JoinRequest(
                protocol_version=pb.PROTOCOL_VERSION_1,
                enrolment_token="bench",
                client_name=f"c{i}",
                model_fingerprint=fingerprint,
            ),
            timeout=60,
        )
        sessions.append((joined.client_id, joined.session_token))
    idle_channels = [
        grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(CONNECTIONS)
    ]
    calls = []
    for i in range(idle_streams):
        c = idle_channels[i % CONNECTIONS]
        watch = health_pb2_grpc.HealthStub(c).Watch(health_pb2.HealthCheckRequest())
        await watch.read()
        calls += [watch, reflection_pb2_grpc.ServerReflectionStub(c).ServerReflectionInfo()]
        cid, token = sessions[0]
        calls.append(
            pb_grpc.FwdLLMStub(c).FetchParameters(pb.FetchParametersRequest(client_id=cid, session_token=token))
        )
    await asyncio.sleep(0.5)
    rss = _rss_mib(pid)
    status = await stub.GetStatus(pb.GetStatusRequest(), timeout=60)
    first_step, stop = status.step, time.monotonic() + window_s

    async def work(cid: str, token: str) -> None:
        while time.monotonic() < stop:
            reply = await stub.PullTask(pb.PullTaskRequest(client_id=cid, session_token=token), timeout=60)
            if reply.WhichOneof("outcome") != "task":
                await asyncio.sleep(0.01)
                continue
            task = reply.task
            seeds = [task.seed_ranges[0].start + k for k in range(task.seed_ranges[0].count)]
            request = pb.SubmitRequest(
                client_id=cid,
                session_token=token,
                task_id=task.task_id,
                step=task.step,
                seeds=seeds,
                jvp=[0.01] * len(seeds),
                num_examples=8,
                loss=pb.LossStats(mean=1.0),
            )
            await stub.Submit(request, timeout=60)

    await asyncio.gather(*(work(cid, token) for cid, token in sessions))
    steps = (await stub.GetStatus(pb.GetStatusRequest(), timeout=60)).step - first_step
    check = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=60)
    for call in calls:
        call.cancel()
    await asyncio.gather(*(call.code() for call in calls))
    for c in (channel, *idle_channels):
        await c.close()
    return {
        "idle streams": 3 * idle_streams,
        f"steps in {window_s:g} s": steps,
        "health": health_pb2.HealthCheckResponse.ServingStatus.Name(check.status),
        "server RSS MiB": round(rss, 1),
    }


def bench(streams: int, window_s: float) -> list[dict]:
    """One row per count of idle streams (0, then ``streams``), each against a fresh server."""
    return [measure(n, window_s) for n in (0, streams)]


def measure(streams: int, window_s: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundle = make_bundle(tmp / "bundle", 2000)
        config = tmp / "config.json"
        config.write_text(
            json.dumps(
                {
                    "run": {"steps": 1_000_000, "clients_per_step": CLIENTS, "min_clients": CLIENTS, "over_select": 0},
                    "aggregation": {"threads": 1},
                    "server": {"rate_per_s": 10_000, "rate_burst": 10_000, "status_access": "public"},
                }
            )
        )
        log = open(tmp / "server.log", "wb")
        argv = ["coordinator", "serve", "--bundle", str(bundle), "--state", str(tmp / "state"), "--port", "0"]
        argv += ["--config", str(config), "--token", "bench"]
        proc = subprocess.Popen([sys.executable, "-m", "fwdllm.cli", *argv], stdout=log, stderr=log)
        try:
            while not (tmp / "state" / "endpoint").exists():
                if proc.poll() is not None:
                    raise SystemExit(f"the server failed to start:\n{(tmp / 'server.log').read_text()}")
                time.sleep(0.1)
            port = int((tmp / "state" / "endpoint").read_text())
            return asyncio.run(steps_in(port, load_manifest(bundle).fingerprint(), window_s, streams, proc.pid))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
            log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=200, help="idle streams of each streaming method")
    parser.add_argument("--window", type=float, default=10.0, help="seconds of work measured")
    args = parser.parse_args(argv)
    rows = bench(args.streams, args.window)
    path = write_results(
        "idle_streams",
        f"python bench/idle_streams.py --streams {args.streams} --window {args.window:g}",
        rows,
        list(rows[0]),
        notes=(
            "Three clients and the server share the machine (2 busy cores); a step is one pull and one submit per "
            "client plus the update (d = 2,000). The idle streams are health Watch, reflection and FetchParameters "
            "(never read), as many of each, over 10 connections."
        ),
    )
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
