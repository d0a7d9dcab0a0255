"""`fwdllm coordinator serve|token|status` and `fwdllm plot`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "coordinator",
        help="run and inspect the federated server",
        description="The gRPC coordinator: rounds, seeds, aggregation, optimiser, persistence.",
    )
    sub = p.add_subparsers(dest="coordinator_command", metavar="ACTION", required=True)

    s = sub.add_parser("serve", help="serve a run (resumes from --state if it holds one)")
    s.add_argument("--bundle", required=True, type=Path, help="the bundle folder (`fwdllm export`)")
    s.add_argument("--state", required=True, type=Path, help="folder for the database, checkpoints and metrics")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    s.add_argument("--port", type=int, default=50051, help="port (default 50051; 0 picks a free one)")
    s.add_argument("--config", type=Path, help="TOML or JSON settings (see coordinator/config.py)")
    s.add_argument("--tls-cert", type=Path, help="PEM server certificate (with --tls-key)")
    s.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    s.add_argument(
        "--tls-client-ca", type=Path, help="PEM CA certificate: devices must present a certificate it signed (mTLS)"
    )
    s.add_argument(
        "--token",
        action="append",
        default=[],
        help="also accept this enrolment token (repeatable; stored like `coordinator token`)",
    )
    s.add_argument(
        "--metrics-port",
        type=int,
        help="also serve Prometheus metrics at http://<--metrics-host>:PORT/metrics (off by default; 0 picks a port)",
    )
    s.add_argument("--metrics-host", default="127.0.0.1", help="address of the metrics endpoint (default 127.0.0.1)")
    s.add_argument("--exit-when-finished", action="store_true", help="stop serving once the last step is applied")
    s.set_defaults(handler=_serve)

    t = sub.add_parser("token", help="issue (or revoke) an enrolment token")
    t.add_argument("--state", required=True, type=Path, help="the coordinator's --state folder")
    t.add_argument("--revoke", metavar="TOKEN", help="revoke this token and end its clients' sessions")
    t.add_argument("--label", default="", help="a note stored with a new token")
    t.set_defaults(handler=_token)

    st = sub.add_parser("status", help="print a running coordinator's progress and counters")
    st.add_argument("--address", required=True, help="host:port of the coordinator")
    st.add_argument("--tls-ca", type=Path, help="PEM certificate to trust (for a TLS server)")
    st.add_argument("--tls-cert", type=Path, help="PEM client certificate, for a server with --tls-client-ca")
    st.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    st.add_argument("--token", help="an enrolment token of the coordinator: needed for counters, metrics and clients")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.set_defaults(handler=_status)

    pl = subparsers.add_parser(
        "plot",
        help="draw one run's metrics, or several runs on one figure, as a PNG",
        description="Each RUN is a metrics.jsonl or the folder of a coordinator state, `fwdllm simulate` run or "
        "`fwdllm baseline` run; curves are drawn against the updates applied, one line per run.",
    )
    pl.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="metrics.jsonl or a run folder")
    pl.add_argument("--out", required=True, type=Path, help="PNG file to write")
    pl.add_argument("--labels", help="comma-separated legend names, one per RUN (default: the runs' folder names)")
    pl.add_argument("--title", default="")
    pl.set_defaults(handler=_plot)


def _serve(args: argparse.Namespace) -> int:
    import logging
    import os

    # Before gRPC loads: its core would log a line for every failed TLS handshake (a scanner's, a wrong CA's).
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from fwdllm.coordinator.config import load_config
    from fwdllm.coordinator.evaluation import evaluator_from_config
    from fwdllm.coordinator.rounds import Coordinator
    from fwdllm.coordinator.server import serve_forever, start

    cfg = load_config(args.config)
    evaluator = evaluator_from_config(cfg.eval, args.bundle)
    coordinator = Coordinator(args.bundle, args.state, cfg, evaluator=evaluator)
    for token in args.token:
        if coordinator.store.token_state(token) == "unknown":
            coordinator.store.add_token(token, "serve --token")
    metrics = None
    if args.metrics_port is not None:  # first: a taken metrics port stops start-up before the run is served
        from fwdllm.coordinator.prometheus import MetricsEndpoint

        metrics = MetricsEndpoint(coordinator, args.metrics_host, args.metrics_port)
    try:
        running = start(coordinator, args.host, args.port, args.tls_cert, args.tls_key, args.tls_client_ca)
        logging.getLogger("fwdllm.coordinator").info(  # shown by default: fwdllm's INFO records are progress
            "serving %s on %s:%d (step %d of %d, state %s)",
            args.bundle,
            args.host,
            running.port,
            coordinator.step,
            cfg.run.steps,
            args.state,
        )
        print(f"fwdllm coordinator: listening on {args.host}:{running.port}", flush=True)
        if metrics is not None:
            print(f"fwdllm coordinator: metrics on http://{args.metrics_host}:{metrics.port}/metrics", flush=True)
        serve_forever(running, args.state / "endpoint", exit_when_finished=args.exit_when_finished)
    finally:
        if metrics is not None:
            metrics.stop()
    return 0


def _token(args: argparse.Namespace) -> int:
    import secrets

    from fwdllm.coordinator.state import Store
    from fwdllm.errors import UserError

    store = Store(args.state)
    try:
        if args.revoke:
            if not store.revoke_token(args.revoke):
                raise UserError("no such token in this state folder; nothing revoked")
            print("revoked")
        else:
            token = secrets.token_hex(24)  # hex: never starts with "-", which argparse would take for an option
            store.add_token(token, args.label)
            print(token)
    finally:
        store.close()
    return 0


def _status(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from fwdllm.device_runtime.connection import certificate_problem, open_channel
    from fwdllm.errors import UserError
    from fwdllm.proto.v1 import fwdllm_pb2 as pb
    from fwdllm.proto.v1 import fwdllm_pb2_grpc as pb_grpc

    channel = open_channel(args.address, args.tls_ca, (1.0, 1.0), args.tls_cert, args.tls_key)
    metadata = [("authorization", f"Bearer {args.token}")] if args.token else None
    try:
        reply = pb_grpc.FwdLLMStub(channel).GetStatus(pb.GetStatusRequest(), timeout=10, metadata=metadata)
    except grpc.RpcError as exc:
        if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            raise UserError(f"the coordinator at {args.address} refused --token: {exc.details()}") from None
        tls = exc.code() == grpc.StatusCode.UNAVAILABLE and (args.tls_ca or args.tls_cert)
        problem = tls and certificate_problem(args.address, args.tls_ca, args.tls_cert, args.tls_key)
        if problem:
            raise UserError(problem) from None
        raise UserError(f"no coordinator answered at {args.address} ({exc.code().name}: {exc.details()})") from exc
    finally:
        channel.close()
    if args.json:
        print(json.dumps(MessageToDict(reply, preserving_proto_field_name=True), indent=2))
        return 0
    print(f"step {reply.step}  theta version {reply.theta_version}  {'finished' if reply.finished else 'running'}")
    print(f"model {reply.model_fingerprint[:16]}")
    if not args.token and not reply.counters:  # the answer to a caller without a token
        print("clients, metrics and counters: pass --token (an enrolment token of this coordinator)")
        return 0
    print(f"clients: {reply.clients_registered} registered, {reply.clients_active} active")
    for name in sorted(reply.metrics):
        print(f"  {name:<18} {reply.metrics[name]:.6g}")
    for name in sorted(reply.counters):
        print(f"  {name:<24} {reply.counters[name]}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from fwdllm.coordinator.metrics import plot_runs, read_run
    from fwdllm.errors import UserError

    runs = [read_run(path) for path in args.runs]
    if args.labels is not None:
        labels = args.labels.split(",")
        if len(labels) != len(runs):
            raise UserError(f"--labels names {len(labels)} runs but {len(runs)} were given; give one name per RUN")
        runs = [(label, rows) for label, (_, rows) in zip(labels, runs)]
    out = plot_runs(runs, args.out, args.title)
    print(out, file=sys.stdout)
    return 0
