"""`fwdllm perturb`: print perturbation values, so other implementations of the spec can compare."""

from __future__ import annotations

import argparse
import json

from fwdllm.proto.names import Distribution


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "perturb",
        help="print values of a seeded perturbation (PERTURBATION.md)",
        description="Print elements [offset, offset+count) of the perturbation with this seed.",
    )
    p.add_argument("--seed", type=_uint64, required=True, help="64-bit seed (decimal or 0x hex)")
    p.add_argument("--offset", type=int, default=0, help="index of the first element (default 0)")
    p.add_argument("--count", type=int, default=8, help="number of elements (default 8)")
    p.add_argument("--dist", choices=list(Distribution), default=Distribution.GAUSSIAN)
    p.add_argument("--json", action="store_true", help="one JSON object with float values and their bit patterns")
    p.set_defaults(handler=_perturb)


def _uint64(text: str) -> int:
    value = int(text, 0)
    if not 0 <= value < 1 << 64:
        raise argparse.ArgumentTypeError(f"{text} is not an unsigned 64-bit integer")
    return value


def _perturb(args: argparse.Namespace) -> int:
    from fwdllm.errors import UserError
    from fwdllm.proto.perturbation import SPEC_VERSION, generate

    if args.offset < 0 or args.count < 0:
        raise UserError("--offset and --count must be non-negative")
    values = generate(args.seed, args.offset, args.count, args.dist)
    if args.json:
        print(
            json.dumps(
                {
                    "spec_version": SPEC_VERSION,
                    "seed": args.seed,
                    "offset": args.offset,
                    "dist": args.dist,
                    "values": [float(v) for v in values],
                    "bits": [f"{b:08x}" for b in values.view("<u4").tolist()],
                }
            )
        )
    else:
        for i, v in enumerate(values.tolist()):
            print(f"{args.offset + i}\t{v:.9g}")
    return 0
