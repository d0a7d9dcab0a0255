"""The `fwdllm` command. Each role package registers its own subcommands in its `cli` module.

A role's `register(subparsers)` only declares arguments; the handler imports the heavy
modules it needs, so `fwdllm --help` stays fast and a phone without torch can run the
device commands.

Output (console.py): results on stdout; fwdllm's own log records from INFO up on stderr (a
command's progress, e.g. `coordinator serve`'s "serving" line and one line per step); library
warnings and converter chatter in a log file that an error line names, or on the terminal with
`-v`. A reader that closes the pipe early (`fwdllm inspect --json B | head -2`) ends the command
quietly with exit code 141, as a Unix tool killed by SIGPIPE does.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import signal
import sys

from fwdllm import __version__
from fwdllm.console import Console
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
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="also show library warnings and converter output (-vv: debug records too)",
    )
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
    with Console(args.command, args.verbose) as console:
        try:
            code = int(args.handler(args) or 0)
            sys.stdout.flush()  # a reader that went away shows here, not as a traceback at interpreter exit
            return code
        except BrokenPipeError:
            # Later writes (and the interpreter's final flush) go nowhere instead of failing again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 128 + signal.SIGPIPE
        except UserError as exc:
            where = f" (library output: {console.path})" if console.written else ""
            print(f"fwdllm {args.command}: error: {exc}{where}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"fwdllm {args.command}: interrupted", file=sys.stderr)
            return 130
        except Exception:
            if console.written:
                print(f"fwdllm {args.command}: failed; library output: {console.path}", file=sys.stderr)
            raise


if __name__ == "__main__":
    sys.exit(main())
