"""`fwdllm baseline`: backprop federated fine-tuning in PyTorch, measured like a fwdllm run."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from fwdllm.data.cli import add_data_arguments

    p = subparsers.add_parser(
        "baseline", help="backprop federated fine-tuning (FedAvg of PEFT parameters) in PyTorch",
        description="FedAvg with a server optimizer over the same PEFT parameters a bundle trains. Writes "
                    "OUT/metrics.jsonl (held-out loss/accuracy, device seconds, bytes uploaded, peak RSS per "
                    "evaluation), OUT/config.json and the final OUT/theta.safetensors.",
    )
    add_data_arguments(p)
    p.add_argument("--peft", choices=["head", "bitfit", "adapter", "lora", "full"], default="bitfit")
    p.add_argument("--model", default="minilm", help="checkpoint folder or shipped default (default minilm)")
    p.add_argument("--clients", type=int, default=100, help="clients the training data is spread over (default 100)")
    p.add_argument("--per-step", type=int, default=10, help="clients sampled per round (default 10)")
    p.add_argument("--steps", type=int, default=50, help="rounds (default 50)")
    skew = p.add_mutually_exclusive_group()
    skew.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew (default 0.5)")
    skew.add_argument("--iid", action="store_true", help="IID clients")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--local-steps", type=int, default=1, help="local SGD steps per client per round (default 1: FedSGD)")
    p.add_argument("--local-lr", type=float, default=1.0, help="local SGD learning rate (default 1)")
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam", help="server optimizer (default adam)")
    p.add_argument("--lr", type=float, default=None, help="server learning rate (default per --peft)")
    p.add_argument("--eval-every", type=int, default=5, help="rounds between held-out evaluations (default 5)")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N held-out examples only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, like one device core)")
    p.add_argument("--out", required=True, help="run folder")
    p.set_defaults(handler=_baseline)


def _baseline(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fwdllm.baselines import BaselineConfig, run_baseline, summarize
    from fwdllm.data.cli import options_from_args
    from fwdllm.data.partition import open_federated

    cfg = BaselineConfig(
        data=args.data, peft=args.peft, model=args.model, clients=args.clients, per_step=args.per_step, steps=args.steps,
        alpha=None if args.iid else args.alpha, batch_size=args.batch_size, seq_len=args.seq_len,
        local_steps=args.local_steps, local_lr=args.local_lr, optimizer=args.optimizer, lr=args.lr,
        eval_every=args.eval_every, eval_limit=args.eval_limit, seed=args.seed, threads=args.threads,
    )
    cfg.check()
    fed = open_federated(args.data, args.clients, alpha=cfg.alpha, seed=args.seed, options=options_from_args(args))
    records = run_baseline(cfg, Path(args.out), fed)
    print(summarize(records, cfg))
    print(f"metrics: {Path(args.out) / 'metrics.jsonl'}")
    return 0
