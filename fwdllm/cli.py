"""The `fwdllm` command. Each role package registers its own subcommands in its `cli` module.

A role's `register(subparsers)` only declares arguments; the handler imports the heavy
modules it needs, so `fwdllm --help` stays fast and a phone without torch can run the
device commands.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

from fwdllm import __version__
from fwdllm.errors import UserError

ROLE_CLIS = (
    "fwdllm.proto.cli",
    "fwdllm.export.cli",
    "fwdllm.device_runtime.cli",
    "fwdllm.coordinator.cli",
    "fwdllm.data.cli",
    "fwdllm.android_harness.cli",
    "fwdllm.train_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fwdllm",
        description="Federated fine-tuning of language models with forward gradients.",
    )
    parser.add_argument("--version", action="version", version=f"fwdllm {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in ROLE_CLIS:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    logging.basicConfig(
        level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)],
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.handler(args) or 0)
    except UserError as exc:
        print(f"fwdllm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fwdllm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
