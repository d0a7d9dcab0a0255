"""`fwdllm data show` and `fwdllm data partition`: inspect a data set, split it across clients."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_data_arguments(p: argparse.ArgumentParser, *, positional: bool = False, required: bool = True) -> None:
    """The options that name and read a data set; shared by every command that loads one."""
    if positional:
        p.add_argument("data", metavar="DATA", help="data set spec (NAME or NAME:PATH), or a partition folder")
    else:
        p.add_argument(
            "--data",
            required=required,
            metavar="DATA",
            help="data set spec: NAME or NAME:PATH (see `fwdllm data show --help`)",
        )
    p.add_argument(
        "--text-column", help="csv/tsv/jsonl: the text column (comma-separated names are joined; default text)"
    )
    p.add_argument("--label-column", help="csv/tsv/jsonl: the label column (default label)")
    p.add_argument(
        "--heldout-fraction", type=float, default=0.2, help="share held out where the data has no split (default 0.2)"
    )
    p.add_argument("--split-seed", type=int, default=0, help="seed of that held-out split (default 0)")
    p.add_argument(
        "--heldout-file",
        type=Path,
        help="csv/tsv/jsonl: a file of held-out examples (e.g. a dev split); none is carved",
    )
    p.add_argument(
        "--label-map", metavar="VALUE=NAME,...", help="csv/tsv/jsonl: label values to names, e.g. 0=negative,1=positive"
    )


def options_from_args(args: argparse.Namespace):
    from fwdllm.data.datasets import LoadOptions
    from fwdllm.data.tables import parse_label_map

    return LoadOptions(
        text_column=args.text_column,
        label_column=args.label_column,
        heldout_fraction=args.heldout_fraction,
        seed=args.split_seed,
        heldout_file=args.heldout_file,
        label_map=parse_label_map(args.label_map) if args.label_map else None,
    )


def load_from_args(args: argparse.Namespace):
    from fwdllm.data.datasets import load_dataset

    return load_dataset(args.data, options_from_args(args))


def register(subparsers: argparse._SubParsersAction) -> None:
    from fwdllm.data.datasets import describe_formats

    data = subparsers.add_parser(
        "data",
        help="load data sets and partition them across clients",
        description="Data sets:\n" + describe_formats(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    show = sub.add_parser(
        "show",
        help="print example and label counts of a data set or a partition folder",
        description="Data sets:\n" + describe_formats(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_data_arguments(show, positional=True)
    show.set_defaults(handler=_show)

    part = sub.add_parser(
        "partition",
        help="split a data set's training examples into one file per client",
        description="Writes OUT/client-00000.jsonl ..., OUT/heldout.jsonl and OUT/partition.json.\n\n"
        "Data sets:\n" + describe_formats(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_data_arguments(part)
    part.add_argument("--clients", type=int, required=True, help="number of clients")
    skew = part.add_mutually_exclusive_group()
    skew.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="Dirichlet concentration over labels (default 0.5 for labelled data; lower = more skew)",
    )
    skew.add_argument("--iid", action="store_true", help="shuffle uniformly instead of skewing labels")
    part.add_argument(
        "--sizes",
        choices=["equal", "natural"],
        default="equal",
        help="equal client sizes (default) or sizes that follow the per-label Dirichlet draw",
    )
    part.add_argument("--seed", type=int, default=0, help="partition seed (default 0)")
    part.add_argument("--out", required=True, help="output folder")
    part.set_defaults(handler=_partition)


def _show(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fwdllm.data.partition import PARTITION_FILE, read_partition

    if (Path(args.data) / PARTITION_FILE).exists():
        info = read_partition(Path(args.data)).info
        sizes = [c["size"] for c in info["clients"]]
        print(
            f"partition of {info['dataset']}: {info['num_clients']} clients, {info['scheme']}"
            f"{' α=' + str(info['alpha']) if info['alpha'] is not None else ''}, "
            f"{info['sizes']} sizes, seed {info['seed']}"
        )
        print(
            f"client sizes: min {min(sizes)}, max {max(sizes)}, total {sum(sizes)}; held-out {info['heldout']['size']}"
        )
        print(f"label skew (mean total-variation distance to the overall mix): {info['label_skew']:.3f}")
        for c in info["clients"][:10]:
            print(f"  {c['file']}  {c['size']:6d}  " + " ".join(f"{k}={v}" for k, v in c["histogram"].items()))
        if len(info["clients"]) > 10:
            print(f"  ... {len(info['clients']) - 10} more")
        return 0
    data = load_from_args(args)
    print(f"{data.spec} ({data.task}) from {data.source}")
    print(f"train {len(data.train)}, held-out {len(data.heldout)}")
    if data.labels:
        train, held = data.histogram(data.train), data.histogram(data.heldout)
        width = max(len(name) for name in data.labels)
        print(f"  {'label':{width}s}  {'train':>7s}  {'held-out':>8s}")
        for name in data.labels:
            print(f"  {name:{width}s}  {train[name]:7d}  {held[name]:8d}")
    return 0


def _partition(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fwdllm.data.partition import DEFAULT_ALPHA, federate, write_partition

    data = load_from_args(args)
    unlabelled = args.alpha is None and not data.labels  # nothing to skew: IID unless asked otherwise
    alpha = None if args.iid or unlabelled else (args.alpha if args.alpha is not None else DEFAULT_ALPHA)
    fed = federate(data, args.clients, alpha=alpha, seed=args.seed, sizes=args.sizes)
    write_partition(fed, Path(args.out))
    info = fed.info
    sizes = [c["size"] for c in info["clients"]]
    print(
        f"wrote {args.clients} clients ({min(sizes)}–{max(sizes)} examples each, label skew {info['label_skew']:.3f}) "
        f"and {info['heldout']['size']} held-out examples to {args.out}"
    )
    return 0
