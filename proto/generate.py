"""Regenerate the committed gRPC stubs in proto/v1/ from proto/v1/fwdllm.proto.

The stubs are committed so that a phone installs no code generator; `make proto` runs this
script and a test checks that the committed files equal a fresh generation.
Run: python -m fwdllm.proto.generate [--check]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

V1 = Path(__file__).resolve().parent / "v1"
STUBS = ("fwdllm_pb2.py", "fwdllm_pb2.pyi", "fwdllm_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    """Write the stubs into out_dir, importable as ``fwdllm.proto.v1``."""
    from grpc_tools import protoc  # only the developer's machine has grpcio-tools

    with tempfile.TemporaryDirectory() as tmp:
        # The virtual include path makes generated imports read `from fwdllm.proto.v1 import ...`.
        args = [
            "protoc",
            f"-Ifwdllm/proto/v1={V1}",
            f"-I{Path(protoc.__file__).parent / '_proto'}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            "fwdllm/proto/v1/fwdllm.proto",
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed on proto/v1/fwdllm.proto")
        for name in STUBS:
            (out_dir / name).write_bytes((Path(tmp) / "fwdllm/proto/v1" / name).read_bytes())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed stubs are stale")
    args = parser.parse_args(argv)
    if not args.check:
        generate(V1)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [n for n in STUBS if (Path(tmp) / n).read_bytes() != (V1 / n).read_bytes()]
    if stale:
        print(f"stale stubs: {', '.join(stale)}; run `make proto`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
