"""θ files: named tensors like a bundle's theta.safetensors, plus optimiser state, replaced atomically.

A file is written beside its final name, fsynced and renamed, so a crash leaves either the old
file or the whole new one.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fwdllm.proto.manifest import ThetaLayout

STATE_PREFIX = "__state__."


def write_theta(path: Path, layout: ThetaLayout, theta: np.ndarray, extra: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    tensors = {k: np.ascontiguousarray(v) for k, v in layout.split(np.asarray(theta, dtype=np.float32)).items()}
    tensors.update({STATE_PREFIX + k: np.ascontiguousarray(v, dtype=np.float32) for k, v in extra.items()})
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(path)


def read_theta(path: Path, layout: ThetaLayout) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """θ as one flat vector and the extra arrays written with it."""
    from safetensors.numpy import load_file

    tensors = load_file(str(path))
    extra = {k.removeprefix(STATE_PREFIX): v for k, v in tensors.items() if k.startswith(STATE_PREFIX)}
    return layout.flatten({k: v for k, v in tensors.items() if not k.startswith(STATE_PREFIX)}), extra
