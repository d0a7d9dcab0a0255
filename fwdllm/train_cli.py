"""`fwdllm simulate` (a federated run through real processes on loopback) and `fwdllm baseline` (backprop FedAvg)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fwdllm.proto.names import VarianceMode


def register(subparsers: argparse._SubParsersAction) -> None:
    from fwdllm.data.cli import add_data_arguments
    from fwdllm.device_runtime.backend import BACKENDS, DEFAULT_BACKEND

    s = subparsers.add_parser(
        "simulate",
        help="a federated run on this machine: real coordinator and device processes over loopback gRPC",
        description="Partitions the data, starts `fwdllm coordinator serve` and device worker processes (each hosting "
        "several virtual clients), shows progress, and writes OUT/convergence.png, OUT/report.md and the "
        "final OUT/theta.safetensors. Ctrl-C stops it; --resume continues it.",
    )
    s.add_argument("--out", required=True, type=Path, help="run folder")
    s.add_argument(
        "--resume", action="store_true", help="continue the stopped simulation in --out (other settings come from it)"
    )
    s.add_argument("--bundle", help="bundle folder (`fwdllm export`)")
    add_data_arguments(s, required=False)  # --resume takes the data from the run folder
    s.add_argument("--clients", type=int, default=100, help="virtual clients (default 100)")
    s.add_argument("--per-step", type=int, default=10, help="clients per step (default 10)")
    s.add_argument("--steps", type=int, default=100, help="optimisation steps (default 100)")
    s.add_argument("--workers", type=int, default=2, help="device processes hosting the clients (default 2)")
    s.add_argument(
        "--backend", default=DEFAULT_BACKEND, choices=list(BACKENDS), help=f"device backend (default {DEFAULT_BACKEND})"
    )
    s.add_argument("--perturbations", type=int, default=1, help="perturbations per client per step (default 1)")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--epsilon", type=float, default=0.01, help="finite-difference step (default 0.01)")
    s.add_argument("--optimizer", choices=["sgd", "momentum", "adam"], default="sgd")
    s.add_argument("--lr", type=float, default=0.01)
    s.add_argument("--schedule", default="linear", help="learning-rate schedule (default linear decay, as FwdLLM)")
    s.add_argument("--clip-norm", type=float, default=None, help="clip the gradient estimate to this L2 norm")
    s.add_argument(
        "--variance",
        choices=list(VarianceMode),
        default=VarianceMode.OFF,
        help="variance control: more waves of perturbations while the estimate is noisy (default off)",
    )
    s.add_argument("--max-waves", type=int, default=8, help="waves per step at most, with variance control")
    s.add_argument("--sampler", action="store_true", help="FwdLLM's discriminative perturbation sampler")
    skew = s.add_mutually_exclusive_group()
    skew.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew (default 0.5)")
    skew.add_argument("--iid", action="store_true", help="IID clients")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--init-theta",
        type=Path,
        metavar="FILE",
        help="start from an earlier run's theta.safetensors: tensors of the same name replace the bundle's "
        "initial values (e.g. BitFit from a trained head)",
    )
    s.add_argument("--eval-every", type=int, default=10, help="steps between held-out evaluations (default 10)")
    s.add_argument("--eval-limit", type=int, default=0, help="evaluate on the first N held-out examples (default all)")
    s.add_argument(
        "--engine",
        choices=["processes", "flower"],
        default="processes",
        help="processes: a coordinator and worker processes over loopback gRPC (default); flower: Flower's "
        "Simulation Engine, one virtual node per client on Ray (needs the flower extra)",
    )
    s.add_argument("--ray-address", help="with --engine flower: an existing Ray cluster (default: local Ray)")
    s.add_argument("--client-cpus", type=float, default=1.0, help="with --engine flower: CPUs per running client")
    s.set_defaults(handler=_simulate)

    p = subparsers.add_parser(
        "baseline",
        help="backprop federated fine-tuning (FedAvg of PEFT parameters) in PyTorch",
        description="FedAvg with a server optimizer over the same PEFT parameters a bundle trains: an encoder "
        "classifier, or a decoder answering with label words when the data set poses its labels so "
        "(e.g. --model smollm2 --data bbc-lm). Writes OUT/metrics.jsonl (held-out loss/accuracy, device "
        "seconds, bytes uploaded, peak RSS per evaluation), OUT/config.json, the final "
        "OUT/theta.safetensors, OUT/report.md and OUT/convergence.png.",
    )
    add_data_arguments(p)
    p.add_argument("--peft", choices=["head", "bitfit", "adapter", "fedadapter", "lora", "full"], default="bitfit")
    p.add_argument("--model", default="minilm", help="checkpoint folder or shipped default (default minilm)")
    p.add_argument("--trainable-layers", default="all", help="layers the PEFT method adapts: all | top:K (default all)")
    p.add_argument("--clients", type=int, default=100, help="clients the training data is spread over (default 100)")
    p.add_argument("--per-step", type=int, default=10, help="clients sampled per round (default 10)")
    p.add_argument("--steps", type=int, default=50, help="rounds (default 50)")
    skew = p.add_mutually_exclusive_group()
    skew.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew (default 0.5)")
    skew.add_argument("--iid", action="store_true", help="IID clients")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument(
        "--local-steps", type=int, default=1, help="local SGD steps per client per round (default 1: FedSGD)"
    )
    p.add_argument("--local-lr", type=float, default=1.0, help="local SGD learning rate (default 1)")
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam", help="server optimizer (default adam)")
    p.add_argument("--lr", type=float, default=None, help="server learning rate (default per --peft)")
    p.add_argument("--eval-every", type=int, default=5, help="rounds between held-out evaluations (default 5)")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N held-out examples only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, like one device core)")
    p.add_argument("--out", required=True, help="run folder")
    p.set_defaults(handler=_baseline)


def _simulate(args: argparse.Namespace) -> int:
    from fwdllm.data.cli import options_from_args
    from fwdllm.errors import UserError
    from fwdllm.simulate import SimConfig, simulate

    cfg = None
    if not args.resume:
        if not args.bundle or not args.data:
            raise UserError("--bundle and --data are required (unless --resume continues a run in --out)")
        cfg = SimConfig(
            bundle=args.bundle,
            data=args.data,
            clients=args.clients,
            per_step=args.per_step,
            steps=args.steps,
            workers=args.workers,
            backend=args.backend,
            perturbations=args.perturbations,
            batch_size=args.batch_size,
            epsilon=args.epsilon,
            optimizer=args.optimizer,
            lr=args.lr,
            schedule=args.schedule,
            clip_norm=args.clip_norm,
            variance=args.variance,
            max_waves=args.max_waves,
            sampler=args.sampler,
            alpha=None if args.iid else args.alpha,
            seed=args.seed,
            eval_every=args.eval_every,
            eval_limit=args.eval_limit,
            init_theta=str(args.init_theta) if args.init_theta else None,
            engine=args.engine,
            ray_address=args.ray_address,
            client_cpus=args.client_cpus,
        )
    s = simulate(cfg, args.out, resume=args.resume, options=None if args.resume else options_from_args(args))
    before, after = s["before"], s["after"]
    print(
        f"held-out accuracy {_pct(before.get('accuracy'))} -> {_pct(after.get('accuracy'))}, "
        f"loss {before.get('eval_loss', float('nan')):.3f} -> {after.get('eval_loss', float('nan')):.3f} "
        f"after {s['steps']} steps ({s['wall_s']:.0f} s)"
    )
    print(f"devices uploaded {s['bytes_up']:,} bytes ({s['perturbations']:,} perturbations)")
    print(f"plot: {s['plot']}\nreport: {s['report']}")
    return 0


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _baseline(args: argparse.Namespace) -> int:
    from fwdllm.baselines import BaselineConfig, run_baseline, summarize
    from fwdllm.data.cli import options_from_args
    from fwdllm.data.partition import open_federated

    cfg = BaselineConfig(
        data=args.data,
        peft=args.peft,
        model=args.model,
        trainable_layers=args.trainable_layers,
        clients=args.clients,
        per_step=args.per_step,
        steps=args.steps,
        alpha=None if args.iid else args.alpha,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        local_steps=args.local_steps,
        local_lr=args.local_lr,
        optimizer=args.optimizer,
        lr=args.lr,
        eval_every=args.eval_every,
        eval_limit=args.eval_limit,
        seed=args.seed,
        threads=args.threads,
    )
    cfg.check()
    fed = open_federated(args.data, args.clients, alpha=cfg.alpha, seed=args.seed, options=options_from_args(args))
    records = run_baseline(cfg, Path(args.out), fed)
    print(summarize(records, cfg))
    print(
        f"metrics: {Path(args.out) / 'metrics.jsonl'}\nplot: {Path(args.out) / 'convergence.png'}\n"
        f"report: {Path(args.out) / 'report.md'}"
    )
    return 0
